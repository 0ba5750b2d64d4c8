"""GPTQ and compressed-tensors layouts: round trips, and tensors built here bit by bit, independently of the packers."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from compress.formats.compressed_tensors import (
    dequantize_compressed_tensors, pack_compressed_tensors, unpack_compressed_tensors,
)
from compress.formats.gptq import (
    GPTQ_BITS, decode_gptq_zeros, dequantize_gptq, encode_gptq_zeros, pack_gptq_qweight, pack_gptq_qzeros,
    unpack_gptq_qweight, unpack_gptq_qzeros,
)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def as_int32(word: int) -> int:
    """An unsigned 32-bit Python int as the signed value an int32 tensor holds."""
    assert 0 <= word < 2**32
    return word - 2**32 if word >= 2**31 else word


def gptq_unit(bits: int) -> int:
    """Smallest length GPTQ can pack: whole int32 words (32 for 3 bits, 32/bits otherwise)."""
    return WORD_BITS // math.gcd(bits, WORD_BITS)


WORD_BITS = 32


# ------------------------------------------------------------------------------------------------------------
# Independent packers, written from AutoGPTQ's / compressed-tensors' documented layouts with plain Python ints.

def autogptq_pack_column(values: list[int], bits: int) -> list[int]:
    """One run of values into words, the way AutoGPTQ's pack loop lays them out (3-bit: 10 | 1 | 10 | 1 | 10)."""
    words = []
    if bits in (2, 4, 8):
        per_word = 32 // bits
        for start in range(0, len(values), per_word):
            word = 0
            for j, v in enumerate(values[start:start + per_word]):
                word |= v << (bits * j)
            words.append(word)
        return words
    assert bits == 3 and len(values) % 32 == 0
    for start in range(0, len(values), 32):
        v = values[start:start + 32]
        w0 = sum(v[j] << (3 * j) for j in range(10)) | ((v[10] & 0b11) << 30)  # value 10: low 2 bits at 30..31
        w1 = (v[10] >> 2) | sum(v[11 + j] << (3 * j + 1) for j in range(10)) | ((v[21] & 1) << 31)
        w2 = (v[21] >> 1) | sum(v[22 + j] << (3 * j + 2) for j in range(10))  # value 21: bits 1..2 at 0..1
        words += [w0, w1, w2]
    assert all(0 <= w < 2**32 for w in words)
    return words


def gptq_checkpoint(q, zeros, scales, g_idx, bits, checkpoint_format):
    """qweight/qzeros/scales/g_idx as an AutoGPTQ (v1: zero - 1 stored) or GPTQModel v2 checkpoint holds them."""
    out_features, in_features = q.shape
    qweight = [[0] * out_features for _ in range(in_features * bits // 32)]
    for o in range(out_features):  # packed along the input dim: column o of qweight holds row o of q
        for r, word in enumerate(autogptq_pack_column(q[o].tolist(), bits)):
            qweight[r][o] = as_int32(word)
    offset = 1 if checkpoint_format == "gptq" else 0
    stored = [[(int(z) - offset) % 2**bits for z in row] for row in zeros.tolist()]
    qzeros = [[as_int32(w) for w in autogptq_pack_column(row, bits)] for row in stored]  # along the output dim
    return (torch.tensor(qweight, dtype=torch.int32), torch.tensor(qzeros, dtype=torch.int32),
            scales.half(), g_idx.int(), torch.tensor(stored, dtype=torch.int32))


def stream_pack_row(values: list[int], bits: int, dense: bool) -> list[int]:
    """compressed-tensors pack_to_int32 on one row of unsigned values, bit by bit.

    dense (>= 0.18): value k starts at stream bit k*bits and may cross into the next word.
    not dense (< 0.18): 32 // bits values per word from bit 0, high bits unused.
    """
    if dense:
        words = [0] * math.ceil(len(values) * bits / 32)
        for k, v in enumerate(values):
            for b in range(bits):
                p = k * bits + b
                words[p // 32] |= ((v >> b) & 1) << (p % 32)
        return words
    per_word = 32 // bits
    words = [0] * math.ceil(len(values) / per_word)
    for k, v in enumerate(values):
        words[k // per_word] |= v << (bits * (k % per_word))
    return words


def ct_checkpoint(q, zp, bits, dense):
    """weight_packed and (for asymmetric) packed weight_zero_point from SIGNED q (out, in) and zp (out, groups)."""
    offset = 2 ** (bits - 1)
    packed = [[as_int32(w) for w in stream_pack_row([v + offset for v in row], bits, dense)] for row in q.tolist()]
    weight_packed = torch.tensor(packed, dtype=torch.int32)
    if zp is None:
        return weight_packed, None
    columns = [stream_pack_row([v + offset for v in col], bits, dense) for col in zp.T.tolist()]  # along dim 0
    return weight_packed, torch.tensor([[as_int32(w) for w in col] for col in columns], dtype=torch.int32).T


def expected_weight(q, zeros_by_col, scales_by_col):
    """W[o][i] = scale * (q - zero), one element at a time in float64 (exact here), as float32."""
    rows = [[float(scales_by_col(o, i)) * (int(q[o, i]) - int(zeros_by_col(o, i))) for i in range(q.shape[1])]
            for o in range(q.shape[0])]
    return torch.tensor(rows, dtype=torch.float64).float()


def actorder_g_idx(in_features, group_size, seed):
    """GPTQ's act-order g_idx: column perm[j] is quantized j-th, so it belongs to group j // group_size."""
    perm = torch.randperm(in_features, generator=gen(seed))
    g_idx = torch.empty(in_features, dtype=torch.int32)
    g_idx[perm] = torch.arange(in_features, dtype=torch.int32) // group_size
    return g_idx


# ------------------------------------------------------------------------------------------------------------
# GPTQ

@pytest.mark.parametrize("bits", GPTQ_BITS)
@settings(max_examples=20, deadline=None)
@given(out_units=st.integers(1, 5), in_units=st.integers(1, 5), groups=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_gptq_round_trips_exactly(bits, out_units, in_units, groups, seed):
    out_features, in_features = out_units * gptq_unit(bits), in_units * gptq_unit(bits)
    ints = torch.randint(0, 2**bits, (out_features, in_features), generator=gen(seed))
    zeros = torch.randint(0, 2**bits, (groups, out_features), generator=gen(seed + 1))
    qweight, qzeros = pack_gptq_qweight(ints, bits), pack_gptq_qzeros(zeros, bits)
    assert qweight.dtype == qzeros.dtype == torch.int32
    assert qweight.shape == (in_features * bits // 32, out_features)
    assert qzeros.shape == (groups, out_features * bits // 32)
    assert torch.equal(unpack_gptq_qweight(qweight, bits, in_features), ints.int())
    assert torch.equal(unpack_gptq_qzeros(qzeros, bits, out_features), zeros.int())
    for fmt in ("gptq", "gptq_v2"):
        assert torch.equal(decode_gptq_zeros(encode_gptq_zeros(zeros, bits, fmt), bits, fmt), zeros.int())


@pytest.mark.parametrize("bits, length", [(4, 12), (2, 8), (3, 16), (3, 48), (8, 2)])
def test_gptq_rejects_lengths_that_leave_a_partial_word(bits, length):
    with pytest.raises(ValueError):
        pack_gptq_qweight(torch.zeros(4 * gptq_unit(bits), length, dtype=torch.int32), bits)
    with pytest.raises(ValueError):
        pack_gptq_qzeros(torch.zeros(2, length, dtype=torch.int32), bits)


def test_gptq_symmetric_4bit_zeros_match_real_checkpoints():
    """Sym 4-bit zero 8: v1 files hold 0x77777777 in every qzeros word, v2 files 0x88888888."""
    zeros = torch.full((1, 16), 8)
    assert torch.equal(pack_gptq_qzeros(encode_gptq_zeros(zeros, 4, "gptq"), 4),
                       torch.full((1, 2), 0x77777777, dtype=torch.int32))
    assert torch.equal(pack_gptq_qzeros(encode_gptq_zeros(zeros, 4, "gptq_v2"), 4),
                       torch.full((1, 2), as_int32(0x88888888), dtype=torch.int32))


@pytest.mark.parametrize("bits, words", [
    (2, [0b01010101010101010101010101010101]),  # 2/4/8: the words GPTQModel adds to convert v1 qzeros to v2
    (4, [0b00010001000100010001000100010001]),
    (8, [0b00000001000000010000000100000001]),
    # 3-bit, per word of each triple: fields at bits 0,3,..,30 | 1,4,..,28 and 31 | 2,5,..,29. GPTQModel before
    # #2763 (Apr 2026) added these three words in the opposite order; it now shifts the decoded fields instead.
    (3, [0b01001001001001001001001001001001, 0b10010010010010010010010010010010, 0b00100100100100100100100100100100]),
])
def test_gptq_one_in_every_field(bits, words):
    packed = pack_gptq_qzeros(torch.ones(2, 64, dtype=torch.int32), bits)
    assert torch.equal(packed, torch.tensor([as_int32(w) for w in words] * (64 * bits // 32 // len(words)),
                                            dtype=torch.int32).expand(2, -1))


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_checkpoint_built_independently_dequantizes_exactly(bits, checkpoint_format, act_order):
    group_size, groups = 32, 3
    in_features, out_features = group_size * groups, 2 * gptq_unit(bits) + (32 if bits == 3 else gptq_unit(bits))
    seed = 10 * bits + act_order
    q = torch.randint(0, 2**bits, (out_features, in_features), generator=gen(seed))
    zeros = torch.randint(0, 2**bits, (groups, out_features), generator=gen(seed + 1))
    zeros[0, :3] = torch.tensor([0, 2**bits - 1, 2 ** (bits - 1)])  # the edges of the v1 "zero - 1" encoding
    scales = (torch.rand(groups, out_features, generator=gen(seed + 2)) * 0.1 + 1e-3).half()
    g_idx = actorder_g_idx(in_features, group_size, seed) if act_order \
        else torch.arange(in_features, dtype=torch.int32) // group_size
    qweight, qzeros, scales, g_idx, stored = gptq_checkpoint(q, zeros, scales, g_idx, bits, checkpoint_format)

    assert torch.equal(unpack_gptq_qweight(qweight, bits, in_features), q.int())
    assert torch.equal(unpack_gptq_qzeros(qzeros, bits, out_features), stored)
    assert torch.equal(decode_gptq_zeros(stored, bits, checkpoint_format), zeros.int())
    assert torch.equal(pack_gptq_qweight(q, bits), qweight)  # the packers write the same words
    assert torch.equal(pack_gptq_qzeros(encode_gptq_zeros(zeros, bits, checkpoint_format), bits), qzeros)

    weight = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, checkpoint_format)
    expected = expected_weight(q, lambda o, i: zeros[g_idx[i], o], lambda o, i: scales[g_idx[i], o])
    assert weight.dtype == torch.float32 and weight.shape == (out_features, in_features)
    assert torch.equal(weight, expected)
    if act_order:  # the group of each column really comes from g_idx
        sequential = torch.arange(in_features, dtype=torch.int32) // group_size
        assert not torch.equal(dequantize_gptq(qweight, qzeros, scales, sequential, bits, checkpoint_format), weight)


def test_gptq_v1_and_v2_differ_by_one_zero_step():
    bits, out_features, in_features = 4, 8, 32
    q = torch.randint(0, 16, (out_features, in_features), generator=gen(0))
    zeros = torch.randint(0, 15, (1, out_features), generator=gen(1))  # stored 15 would wrap to a v1 zero of 0
    scales = torch.rand(1, out_features, generator=gen(2)).half()
    g_idx = torch.zeros(in_features, dtype=torch.int32)
    qweight, qzeros = pack_gptq_qweight(q, bits), pack_gptq_qzeros(zeros, bits)
    v1 = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, "gptq")
    v2 = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, "gptq_v2")
    assert torch.equal(v2 - v1, scales.float().T.expand(-1, in_features))  # v1 reads each stored zero as one more
    with pytest.raises(ValueError):
        dequantize_gptq(qweight, qzeros, scales, g_idx, bits, "gptq_v3")


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized

@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dense", [True, False])
@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_compressed_tensors_round_trips_exactly(bits, dense, rows, cols, seed):
    low = -(2 ** (bits - 1))
    ints = torch.randint(low, -low, (rows, cols), generator=gen(seed))
    packed = pack_compressed_tensors(ints, bits, dense=dense)
    words = math.ceil(cols * bits / 32) if dense else math.ceil(cols / (32 // bits))
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(unpack_compressed_tensors(packed, bits, torch.tensor([rows, cols]), dense=dense), ints.int())


def test_compressed_tensors_library_docstring_example():
    """compressed-tensors' pack_to_int32 docstring: 8-bit [1, 2] -> unsigned [129, 130] -> 33409."""
    assert pack_compressed_tensors(torch.tensor([[1, 2]]), 8).tolist() == [[33409]]
    # Symmetric zero (signed 0) is stored as 2**(bits-1) in every field: 4-bit words of all 8s.
    assert torch.equal(pack_compressed_tensors(torch.zeros(1, 8, dtype=torch.int8), 4),
                       torch.tensor([[as_int32(0x88888888)]], dtype=torch.int32))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dense_and_legacy_layouts_agree_exactly_when_bits_divide_32(bits):
    ints = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (3, 64), generator=gen(bits))
    same = torch.equal(pack_compressed_tensors(ints, bits), pack_compressed_tensors(ints, bits, dense=False))
    assert same == (32 % bits == 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_compressed_tensors_checkpoint_built_independently_dequantizes_exactly(bits, symmetric, dense, act_order):
    out_features, group_size, groups = 13, 16, 3  # odd out: the zero point's packed dim 0 ends in a partial word
    in_features = group_size * groups
    seed = 100 * bits + 10 * symmetric + 2 * dense + act_order
    low = -(2 ** (bits - 1))
    q = torch.randint(low, -low, (out_features, in_features), generator=gen(seed))
    zp = None if symmetric else torch.randint(low, -low, (out_features, groups), generator=gen(seed + 1))
    scale = (torch.rand(out_features, groups, generator=gen(seed + 2)) * 0.1 + 1e-3).to(torch.bfloat16)
    g_idx = actorder_g_idx(in_features, group_size, seed) if act_order else None
    weight_packed, weight_zero_point = ct_checkpoint(q, zp, bits, dense)
    weight_shape = torch.tensor([out_features, in_features])

    assert torch.equal(unpack_compressed_tensors(weight_packed, bits, weight_shape, dense=dense), q.int())
    assert torch.equal(pack_compressed_tensors(q, bits, dense=dense), weight_packed)
    if zp is not None:
        assert torch.equal(pack_compressed_tensors(zp.T, bits, dense=dense).T, weight_zero_point)

    weight = dequantize_compressed_tensors(weight_packed, scale, weight_zero_point, g_idx, weight_shape, bits,
                                           symmetric, group_size, dense=dense)
    group = (lambda i: int(g_idx[i])) if act_order else (lambda i: i // group_size)
    expected = expected_weight(q, lambda o, i: 0 if zp is None else zp[o, group(i)],
                               lambda o, i: scale[o, group(i)].float())
    assert weight.dtype == torch.float32 and torch.equal(weight, expected)
    if zp is not None:  # before compressed-tensors 0.10 the zero point was stored unpacked: (out, groups) int8
        plain = dequantize_compressed_tensors(weight_packed, scale, zp.to(torch.int8), g_idx, weight_shape, bits,
                                              symmetric, group_size, dense=dense)
        assert torch.equal(plain, weight)


def test_compressed_tensors_symmetric_stores_the_unsigned_grid_value():
    """A 4-bit unsigned grid value u with zero 8 is stored as u: W = scale * (u - 8)."""
    u = torch.randint(0, 16, (4, 40), generator=gen(0))
    packed = pack_compressed_tensors(u - 8, 4)
    assert packed.tolist() == [[as_int32(w) for w in stream_pack_row(row, 4, True)] for row in u.tolist()]
    scale = torch.full((4, 1), 0.5)
    weight = dequantize_compressed_tensors(packed, scale, None, None, (4, 40), 4, True, None)  # strategy "channel"
    assert torch.equal(weight, 0.5 * (u - 8).float())


def test_compressed_tensors_channel_strategy_asymmetric():
    bits, out_features, in_features = 4, 10, 24
    q = torch.randint(-8, 8, (out_features, in_features), generator=gen(3))
    zp = torch.randint(-8, 8, (out_features, 1), generator=gen(4))
    scale = torch.rand(out_features, 1, generator=gen(5)).half()
    weight_packed, weight_zero_point = ct_checkpoint(q, zp, bits, True)
    assert weight_zero_point.shape == (math.ceil(out_features * bits / 32), 1)
    weight = dequantize_compressed_tensors(weight_packed, scale, weight_zero_point, None, (out_features, in_features),
                                           bits, False, None)
    assert torch.equal(weight, scale.float() * (q - zp).float())


def test_compressed_tensors_rejects_inconsistent_inputs():
    q = torch.zeros(4, 32, dtype=torch.int32)
    packed, scale = pack_compressed_tensors(q, 4), torch.ones(4, 2)
    zp_packed = pack_compressed_tensors(torch.zeros(2, 4, dtype=torch.int32), 4).T
    with pytest.raises(ValueError):  # symmetric schemes store no zero point
        dequantize_compressed_tensors(packed, scale, zp_packed, None, (4, 32), 4, True, 16)
    with pytest.raises(ValueError):  # asymmetric schemes need one
        dequantize_compressed_tensors(packed, scale, None, None, (4, 32), 4, False, 16)
    with pytest.raises(ValueError):  # scale columns do not match group_size
        dequantize_compressed_tensors(packed, scale, None, None, (4, 32), 4, True, 8)
    uneven = torch.tensor([0] * 20 + [1] * 12, dtype=torch.int32)
    with pytest.raises(ValueError):  # actorder g_idx holds group_size columns per group
        dequantize_compressed_tensors(packed, scale, None, uneven, (4, 32), 4, True, 16)
    unfilled = torch.full((32,), -1, dtype=torch.int32)  # an initialized-but-unset g_idx means column order
    assert torch.equal(dequantize_compressed_tensors(packed, scale, None, unfilled, (4, 32), 4, True, 16),
                       torch.zeros(4, 32))
