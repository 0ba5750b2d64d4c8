"""The recipe: plain data that says what to do to a model. The CLI only builds one; every output holds it."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compress.errors import CompressError

FACTORIZE_METHODS = ("svd", "svd-llm", "saes-svd", "eora", "lorap")
ALLOCATORS = ("uniform", "welore", "lorap")
QUANTIZE_METHODS = ("rtn", "gptq", "lrq", "cbq")
BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class Factorize:
    """W ~= up @ down with the targeted layers together holding `rank_budget` of their dense parameters.

    method: svd (plain), svd-llm (whitened), saes-svd (CEALC + ACES), eora (eigenspace projection),
    lorap (activation-weighted SVD for attention, structured channel pruning for the MLP).
    allocate: uniform (same share per layer), welore (from each weight's spectrum; layers whose
    factors would not save parameters stay dense), lorap (LoRAP's 3:1 v/o : q/k split; only with lorap).
    beta: SAES-SVD's coefficient alpha/(1+alpha); None lets ACES choose it per layer in [beta_min, beta_max].
    """

    method: str = "svd-llm"
    rank_budget: float = 0.5
    allocate: str = "uniform"
    beta: float | None = None
    beta_min: float = 0.25
    beta_max: float = 0.75

    def __post_init__(self):
        _choice("factorize method", self.method, FACTORIZE_METHODS)
        _choice("allocator", self.allocate, ALLOCATORS)
        if not 0 < self.rank_budget <= 1:
            raise CompressError(f"rank budget must be in (0, 1], got {self.rank_budget}")
        if (self.method == "lorap") != (self.allocate == "lorap"):
            raise CompressError("lorap factorization and lorap allocation go together (--factorize lorap --allocate lorap)")
        if self.beta is not None and not 0 <= self.beta < 1:
            raise CompressError(f"beta must be in [0, 1), got {self.beta}")
        if not 0 <= self.beta_min <= self.beta_max < 1:
            raise CompressError(f"need 0 <= beta_min <= beta_max < 1, got [{self.beta_min}, {self.beta_max}]")


@dataclass(frozen=True)
class Quantize:
    """Quantize the weights (or the factors, after Factorize) to `bits`, per group of `group_size` input columns.

    group_size 0 means one group per row; a group size that does not divide a tensor falls back to
    the largest divisor below it, and the report says so. GPTQ only: act_order (columns in order of
    decreasing Hessian diagonal), static_groups (group scales fixed on the original weight), damp
    (fraction of the mean Hessian diagonal added to it; raised automatically when Cholesky fails).
    LRQ and CBQ (learned on calibration data): rank of the low-rank matrices (LRQ's weight scaling, None: 16,
    scaled down from the paper's 1024; CBQ's LoRA-Rounding, None: 5, not from the paper), iterations, lr, seed.
    CBQ only: windows of `window` blocks overlapping by `overlap` (2 and 1, the methods card's reading).
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    rank: int | None = None
    iterations: int = 200
    lr: float = 1e-3
    seed: int = 0
    window: int = 2
    overlap: int = 1

    def __post_init__(self):
        _choice("quantize method", self.method, QUANTIZE_METHODS)
        if self.bits not in BITS:
            raise CompressError(f"wbits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size < 0:
            raise CompressError(f"group size must be >= 0 (0: one group per row), got {self.group_size}")
        if not 0 <= self.damp <= 1:
            raise CompressError(f"damp must be in [0, 1], got {self.damp}")
        if self.method != "gptq" and (self.act_order or self.static_groups):
            raise CompressError("act-order and static groups are GPTQ options (--quantize gptq)")
        if self.iterations < 0 or self.lr <= 0 or (self.rank is not None and self.rank < 1):
            raise CompressError("iterations must be >= 0, lr > 0 and rank >= 1")
        if not 0 <= self.overlap < self.window:
            raise CompressError(f"CBQ needs 0 <= overlap < window, got window {self.window}, overlap {self.overlap}")


@dataclass(frozen=True)
class Calibration:
    """`nsamples` windows of `seqlen` tokens drawn with `seed` from `source` (None: the bundled corpus).

    seqlen None: the smaller of 2048 and the model's maximum positions.
    """

    source: str | None = None
    nsamples: int = 128
    seqlen: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.nsamples < 1:
            raise CompressError(f"nsamples must be >= 1, got {self.nsamples}")
        if self.seqlen is not None and self.seqlen < 2:
            raise CompressError(f"seqlen must be >= 2, got {self.seqlen}")


COMPENSATE_METHODS = ("lorc", "eora")


@dataclass(frozen=True)
class Compensate:
    """Low-rank compensation of the quantization error W - W_hat: W ~= base + up @ down.

    lorc: ZeroQuant-V2's plain SVD of the error; eora: the error projected into the eigenspace of the
    input Gram and truncated there. factor_bits: quantize up and down per output channel (None: fp16).
    """

    method: str = "eora"
    rank: int = 64
    factor_bits: int | None = None

    def __post_init__(self):
        _choice("compensation method", self.method, COMPENSATE_METHODS)
        if self.rank < 1:
            raise CompressError(f"compensation rank must be >= 1, got {self.rank}")
        if self.factor_bits is not None and self.factor_bits not in BITS:
            raise CompressError(f"factor bits must be one of {', '.join(map(str, BITS))}, got {self.factor_bits}")


@dataclass(frozen=True)
class Recipe:
    """Stages run in this order on every targeted linear: factorize, then quantize (the factors, if any),
    then compensate the quantization error (only without factorize).

    include / exclude: regular expressions over full module names; by default every linear inside
    the decoder blocks is compressed (embeddings and the LM head stay as they are).
    """

    factorize: Factorize | None = None
    quantize: Quantize | None = None
    compensate: Compensate | None = None
    calibration: Calibration = field(default_factory=Calibration)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self):
        if self.factorize is None and self.quantize is None and self.compensate is None:
            raise CompressError("nothing to do: give a rank budget (--rank-budget), a bit width (--wbits), or both")
        if self.compensate is not None and self.factorize is not None:
            raise CompressError("compensation corrects a quantized weight: use it with --wbits and without --rank-budget")
        if self.factorize is not None and self.quantize is not None and self.quantize.method in ("lrq", "cbq"):
            raise CompressError(f"{self.quantize.method} learns the quantized weights of whole blocks: "
                                "use it without --rank-budget")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        _known_keys("recipe", data, cls)
        parts = {"factorize": Factorize, "quantize": Quantize, "compensate": Compensate, "calibration": Calibration}
        kwargs = dict(data)
        for key, kind in parts.items():
            if kwargs.get(key) is not None:
                if not isinstance(kwargs[key], dict):
                    raise CompressError(f"recipe: '{key}' must be a mapping, got {kwargs[key]!r}")
                _known_keys(f"recipe.{key}", kwargs[key], kind)
                kwargs[key] = kind(**kwargs[key])
        if kwargs.get("calibration") is None:
            kwargs.pop("calibration", None)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a recipe from a .json, .yaml or .yml file."""
        path = Path(path)
        try:
            text = path.read_text()
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            raise CompressError(f"cannot read recipe {path}: {exc}".splitlines()[0]) from None
        if not isinstance(data, dict):
            raise CompressError(f"recipe {path} must hold a mapping at the top level")
        return cls.from_dict(data)


def _choice(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise CompressError(f"unknown {what} '{value}' (choose from {', '.join(allowed)})")


def _known_keys(where: str, data: dict, kind: type) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(kind)})
    if unknown:
        raise CompressError(f"{where}: unknown key(s) {', '.join(unknown)}")
