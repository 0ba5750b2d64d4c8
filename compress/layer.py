"""The one compressed layer: y = x @ base^T + (x @ down^T) @ up^T (+ bias), each part dense, quantized or absent."""
from __future__ import annotations

import torch
from torch import nn

import kernels
from kernels.cpu_serving import Int4CPU, Int8CPU
from kernels.grid import QuantizedWeight
from kernels.reference import materialize


class DenseTensor(nn.Module):
    """A dense weight held as a buffer, so that it lands in the state dict under `<part>.weight`."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)
        self.shape = tuple(weight.shape)

    def operand(self) -> torch.Tensor:
        return self.weight

    def spec(self) -> dict:
        return {"kind": "dense", "shape": list(self.shape), "dtype": str(self.weight.dtype).removeprefix("torch.")}


class PackedTensor(nn.Module):
    """A quantized weight held as buffers `qweight`, `scales` (and `qzeros` when asymmetric)."""

    def __init__(self, quantized: QuantizedWeight):
        super().__init__()
        for name, tensor in quantized.tensors().items():
            self.register_buffer(name, tensor)
        self.qzeros, self.g_idx = quantized.qzeros, quantized.g_idx
        self.bits, self.group_size, self.shape = quantized.bits, quantized.group_size, tuple(quantized.shape)

    def operand(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.qzeros, self.bits, self.group_size, self.shape,
                               self.g_idx)

    def spec(self) -> dict:
        return {"kind": "quantized", "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "symmetric": self.qzeros is None, "act_order": self.g_idx is not None}


Part = DenseTensor | PackedTensor


def make_part(value: torch.Tensor | QuantizedWeight | None) -> Part | None:
    if value is None:
        return None
    return PackedTensor(value) if isinstance(value, QuantizedWeight) else DenseTensor(value)


def empty_part(spec: dict | None) -> Part | None:
    """A part with the shapes a spec describes and uninitialised values (to be filled from a state dict)."""
    if spec is None:
        return None
    rows, cols = spec["shape"]
    if spec["kind"] == "dense":
        return DenseTensor(torch.empty(rows, cols, dtype=getattr(torch, spec["dtype"])))
    bits, group_size = spec["bits"], spec["group_size"]
    if bits not in (2, 3, 4, 8) or group_size < 1 or cols % group_size:
        raise ValueError(f"bad quantized spec {spec}")
    words = -(-cols // 32) * bits
    groups = cols // group_size
    qzeros = None if spec["symmetric"] else torch.empty(groups, -(-rows // 32) * bits, dtype=torch.int32)
    g_idx = torch.empty(cols, dtype=torch.int32) if spec.get("act_order") else None
    return PackedTensor(QuantizedWeight(torch.empty(rows, words, dtype=torch.int32),
                                        torch.empty(rows, groups, dtype=torch.float16),
                                        qzeros, bits, group_size, (rows, cols), g_idx))


class CompressedLinear(nn.Module):
    """Drop-in replacement for nn.Linear holding W ~= base + up @ down."""

    def __init__(self, in_features: int, out_features: int, base: Part | None, up: Part | None, down: Part | None,
                 bias: torch.Tensor | None = None, kernel: str = "auto"):
        super().__init__()
        if base is None and up is None:
            raise ValueError("a compressed layer needs a base, factors, or both")
        if (up is None) != (down is None):
            raise ValueError("up and down come together")
        self.in_features, self.out_features = in_features, out_features
        self.base, self.up, self.down = base, up, down
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel = kernel  # which matmul serves forward (kernels.lowrank_linear): auto, reference or triton
        self.dense_operands: dict | None = None  # see keep_dense
        self.served: Int4CPU | None = None  # see serve_on_cpu
        self.served_factors: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_parts(cls, base, up, down, bias=None, kernel: str = "auto") -> "CompressedLinear":
        """Build from tensors / QuantizedWeights (any may be None)."""
        base, up, down = make_part(base), make_part(up), make_part(down)
        out_features, in_features = (base or up).shape[0], (base or down).shape[1]
        return cls(in_features, out_features, base, up, down, bias, kernel)

    @classmethod
    def from_spec(cls, spec: dict) -> "CompressedLinear":
        """An empty layer with the shapes that a compression_config entry describes."""
        bias = torch.empty(spec["out_features"]) if spec.get("bias") else None
        return cls(spec["in_features"], spec["out_features"], empty_part(spec["base"]), empty_part(spec["up"]),
                   empty_part(spec["down"]), bias)

    @property
    def rank(self) -> int:
        return 0 if self.up is None else self.up.shape[1]

    def spec(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "rank": self.rank, **{name: None if part is None else part.spec()
                                      for name, part in (("base", self.base), ("up", self.up), ("down", self.down))}}

    def operands(self) -> tuple:
        return tuple(None if part is None else part.operand() for part in (self.base, self.up, self.down))

    def weight_approx(self) -> torch.Tensor:
        """The dense (out, in) weight this layer represents, in float32."""
        base, up, down = (materialize(operand, torch.float32) for operand in self.operands())
        if up is None:
            return base
        return up @ down if base is None else base + up @ down

    def stored_bits(self) -> int:
        """Every bit of the stored weight tensors: ints, scales, zeros and factors (not the bias)."""
        return sum(buffer.numel() * buffer.element_size() * 8 for buffer in self.buffers())

    def keep_dense(self, keep: bool = True) -> None:
        """Keep the parts dequantized, per dtype, from their first use on (keep=False: drop them): the same numbers
        without dequantizing on every call, for as long as a dense copy's memory is affordable (compress_model:
        while the layer's block is calibrated)."""
        self.dense_operands = {} if keep else None

    def serve_on_cpu(self) -> bool:
        """Serve forward through torch's CPU int4 or int8 kernel (kernels.cpu_serving, bfloat16) when the base allows
        it, the low-rank part as two small float32 matmuls; the base's own buffers are dropped, so the layer holds the
        packed size once but can no longer be saved. Returns whether the layer is served so."""
        if not isinstance(self.base, PackedTensor):
            return False
        quantized = self.base.operand()
        served = Int4CPU.from_quantized(quantized) or Int8CPU.from_quantized(quantized)
        if served is None:
            return False
        self.served, self.base = served, None
        if self.up is not None:
            self.served_factors = (materialize(self.up.operand(), torch.float32),
                                   materialize(self.down.operand(), torch.float32))
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.served is not None:
            y = self.served(x)
            if self.served_factors is not None:
                up, down = self.served_factors
                y = y + ((x.to(down.dtype) @ down.T) @ up.T).to(y.dtype)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if self.dense_operands is None:
            return kernels.lowrank_linear(x, *self.operands(), self.bias, kernel=self.kernel)
        operands = self.dense_operands.get(x.dtype)
        if operands is None:
            operands = self.dense_operands[x.dtype] = tuple(materialize(part, x.dtype) for part in self.operands())
        return kernels.lowrank_linear(x, *operands, self.bias, kernel=self.kernel)

    def extra_repr(self) -> str:
        parts = ", ".join(f"{name}={part.spec()['kind']}"
                          for name, part in (("base", self.base), ("up", self.up)) if part)
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, {parts}"


def serve_on_cpu(model: nn.Module) -> dict[str, int]:
    """Serve every CompressedLinear that a CPU kernel takes through it (CompressedLinear.serve_on_cpu), for inference
    only; returns how many layers each kernel serves and how many keep the reference path."""
    counts = {"int4": 0, "int8": 0, "reference": 0}
    for layer in [layer for layer in model.modules() if isinstance(layer, CompressedLinear)]:
        served = layer.serve_on_cpu()
        counts["reference" if not served else "int4" if isinstance(layer.served, Int4CPU) else "int8"] += 1
    return counts
