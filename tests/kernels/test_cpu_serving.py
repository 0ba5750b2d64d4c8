"""The CPU serving paths: the project's integers through torch's int4 and int8 kernels give the reference's outputs up
to bfloat16 rounding, and layers they cannot take keep the reference path."""
import pytest
import torch

from compress import GPTQ, Recipe, compress_model
from compress.compensate.lorc import LoRC
from compress.layer import CompressedLinear, serve_on_cpu
from kernels.cpu_serving import Int4CPU, Int8CPU, int4_available, int8_available
from kernels.grid import find_params, make_quantized, quantize_ints
from tests.conftest import tiny_llama

pytestmark = pytest.mark.skipif(not (int4_available() and int8_available()), reason="this torch lacks the CPU kernels")


def quantized(out: int, inp: int, bits: int, group_size: int, symmetric: bool, seed: int = 0):
    weight = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed))
    scales, zeros = find_params(weight, bits, group_size, symmetric)
    return make_quantized(quantize_ints(weight, scales, zeros, bits), scales, zeros, bits, symmetric)


@pytest.mark.parametrize("bits, group_size, symmetric", [(4, 32, False), (4, 64, True), (4, 128, False),
                                                      (3, 64, False), (2, 128, True)])
def test_int4_kernel_gives_the_grids_values_up_to_bfloat16(bits, group_size, symmetric):
    weight = quantized(96, 256, bits, group_size, symmetric)
    served = Int4CPU.from_quantized(weight)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    reference = x @ weight.dequantize().T
    # the same product with every input the kernel reads rounded to bfloat16, as it reads them
    centre = 8 - 2 ** (bits - 1)  # 2/3-bit integers sit at the centre of the 4-bit field
    scales = weight.scales.float().to(torch.bfloat16).float().repeat_interleave(group_size, 1)
    shift = (weight.scales.float() * (8 - weight.zeros().float() - centre)).to(torch.bfloat16).float()
    rounded = scales * (weight.ints().float() + centre - 8) + shift.repeat_interleave(group_size, 1)
    bf16_reference = x.to(torch.bfloat16).float() @ rounded.T
    y = served(x)
    assert y.dtype == torch.float32
    scale = reference.abs().max()
    assert (y - bf16_reference).abs().max() < 5e-3 * scale  # the kernel's own bfloat16 accumulation (~2.4e-3)
    assert (y - reference).abs().max() < 1e-2 * scale  # ~4e-3


@pytest.mark.parametrize("group_size, symmetric", [(128, False), (64, True), (256, False)])
def test_int8_kernel_gives_the_grids_values_up_to_bfloat16(group_size, symmetric):
    weight = quantized(96, 256, 8, group_size, symmetric)
    assert Int4CPU.from_quantized(weight) is None
    served = Int8CPU.from_quantized(weight)
    assert served.nbytes() < 1.2 * 96 * 256  # a byte per weight, and the scales
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    reference = x @ weight.dequantize().T
    y = served(x)
    assert y.dtype == torch.float32
    assert (y - reference).abs().max() < 1e-2 * reference.abs().max()  # bfloat16 inputs and scales


@pytest.mark.parametrize("bits, out, act_order", [(4, 100, False), (4, 96, True), (8, 96, True)])
def test_grids_the_kernel_cannot_take_keep_the_reference(bits, out, act_order):
    weight = quantized(out, 256, bits, 64, False)
    if act_order:
        weight = make_quantized(weight.ints(), weight.scales.float(), weight.zeros(), bits, False,
                                g_idx=torch.arange(256).flip(0) // 64)
    assert Int4CPU.from_quantized(weight) is None and Int8CPU.from_quantized(weight) is None
    layer = CompressedLinear.from_parts(weight, None, None)
    assert not layer.serve_on_cpu() and layer.served is None


@pytest.mark.parametrize("bits, kernel", [(4, "int4"), (8, "int8")])
def test_a_served_model_gives_the_compressed_models_logits(one_thread, bits, kernel):
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 4096, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(quantize=GPTQ(bits=bits, group_size=32), compensate=LoRC(rank=8))
    compressed = compress_model(model, recipe, calib=ids, progress=False).model
    with torch.no_grad():
        reference = compressed(ids).logits
        counts = serve_on_cpu(compressed)
        served = compressed(ids).logits
    # every block linear: widths 64 and 160, k/v 32 wide, all multiples of 16
    assert counts == {"int4": 0, "int8": 0, "reference": 0} | {kernel: 14}
    relative = (served - reference).abs().max() / reference.abs().max()
    assert relative < 2e-2
    assert (served.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
