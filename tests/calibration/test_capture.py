import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from calibration import GramAccumulator, Statistics, group_statistics, load_text, record_grams, sample_windows
from calibration.data import CalibrationError

DOCS = ["def first():\n    return 1\n", "class Second:\n    pass\n", "import os\nprint(os.sep)\n"]


def test_local_sources_of_each_kind_give_the_same_text(tmp_path):
    (tmp_path / "one.txt").write_text(DOCS[0])
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(DOCS):
        (txt_dir / f"{i}.txt").write_text(doc)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    pq.write_table(pa.table({"text": DOCS}), tmp_path / "docs.parquet")
    assert load_text(tmp_path / "one.txt") == DOCS[0]
    expected = "\n\n".join(DOCS)
    for source in (txt_dir, tmp_path / "docs.jsonl", tmp_path / "docs.parquet"):
        assert load_text(source) == expected, source
    assert load_text(tmp_path / "docs.jsonl", max_chars=len(DOCS[0])) == DOCS[0]
    assert load_text(tmp_path / "docs.jsonl", max_chars=len(DOCS[0]) + 5) == DOCS[0] + "\n\n" + DOCS[1][:5]
    assert load_text(tmp_path / "one.txt", max_chars=10) == DOCS[0][:10]  # one long document is cut too


def test_source_without_text_column_is_refused(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hi"}) + "\n")
    with pytest.raises(CalibrationError, match="no 'text' column"):
        load_text(tmp_path / "x.jsonl")


def test_windows_are_seeded_and_within_the_text(demo_tokenizer):
    text = "\n".join(f"value_{i} = {i} * {i}" for i in range(400))
    a = sample_windows(demo_tokenizer, text, 5, 24, seed=1)
    assert a.shape == (5, 24)
    assert torch.equal(a, sample_windows(demo_tokenizer, text, 5, 24, seed=1))
    assert not torch.equal(a, sample_windows(demo_tokenizer, text, 5, 24, seed=2))
    ids = demo_tokenizer(text, add_special_tokens=False)["input_ids"]
    joined = " ".join(map(str, ids))
    assert all(" ".join(map(str, row.tolist())) in joined for row in a)
    with pytest.raises(CalibrationError, match="fewer than one window"):
        sample_windows(demo_tokenizer, "x = 1", 1, 24, seed=0)


def test_gram_accumulates_in_float64_over_batches():
    layer = torch.nn.Linear(6, 3)
    batches = [torch.randn(2, 5, 6) for _ in range(3)]
    with record_grams({"layer": layer}) as grams:
        for batch in batches:
            layer(batch)
    x = torch.cat([b.reshape(-1, 6) for b in batches]).double()
    assert grams["layer"].gram.dtype == torch.float64
    assert grams["layer"].count == 30
    assert torch.allclose(grams["layer"].gram, x.T @ x)
    layer(batches[0])  # hooks are gone after the block
    assert grams["layer"].count == 30
    acc = GramAccumulator(6)
    acc.add(batches[0].half())
    assert acc.gram.dtype == torch.float64


def test_float32_products_sum_in_float64_to_the_gram_within_float32_rounding():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, 64, generator=g) * 30 + 5 for _ in range(4)]
    exact, fast = GramAccumulator(64, cross=True), GramAccumulator(64, cross=True, product_dtype=torch.float32)
    for batch in batches:
        offset = torch.randn(batch.shape, generator=g) * 0.1
        exact.add(batch, batch + offset)
        fast.add(batch, batch + offset)
    assert fast.gram.dtype == fast.cross.dtype == torch.float64 and fast.count == exact.count == 4 * 4096
    for ours, reference in ((fast.gram, exact.gram), (fast.cross, exact.cross)):
        error = (ours - reference).abs().max() / reference.abs().max()
        assert 0 < error < 1e-6  # float32 rounding: present, and small


class Branches(torch.nn.Module):
    """q and k read the same input; o reads their product; tail runs after every linear of interest."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o, self.tail = (torch.nn.Linear(6, 4), torch.nn.Linear(6, 4), torch.nn.Linear(4, 6),
                                             torch.nn.Linear(6, 6))

    def forward(self, x):
        return self.tail(self.o(torch.relu(self.q(x)) * self.k(x)))


def test_group_statistics_hold_both_streams():
    block = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6))
    hidden, fp_hidden = torch.randn(5, 3, 6), torch.randn(5, 3, 6)
    stats, fp_out = group_statistics(block, [("0",), ("2",)], hidden, {}, fp_hidden, cross=True, fp_outputs=True,
                                     batch_size=2)
    assert isinstance(stats["0"], Statistics)
    x, xf = hidden.reshape(-1, 6).double(), fp_hidden.reshape(-1, 6).double()
    assert torch.allclose(stats["0"].gram, x.T @ x)
    assert torch.allclose(stats["0"].cross, (xf - x).T @ x)
    h = torch.relu(block[0](hidden)).reshape(-1, 4).double()
    hf = torch.relu(block[0](fp_hidden)).reshape(-1, 4).double()
    assert torch.allclose(stats["2"].gram, h.T @ h, atol=1e-6)
    assert torch.allclose(stats["2"].cross, (hf - h).T @ h, atol=1e-6)
    assert torch.allclose(fp_out, block(fp_hidden))


def test_group_statistics_without_the_full_precision_stream():
    block = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6))
    hidden = torch.randn(5, 3, 6)
    stats, fp_out = group_statistics(block, [("0",), ("2",)], hidden, {}, batch_size=2)
    assert fp_out is None
    assert stats["0"].cross is None and stats["2"].cross is None
    x = hidden.reshape(-1, 6).double()
    h = torch.relu(block[0](hidden)).reshape(-1, 4).double()
    assert torch.allclose(stats["0"].gram, x.T @ x)
    assert torch.allclose(stats["2"].gram, h.T @ h, atol=1e-6)
    assert torch.equal(stats["0"].gram, stats["0"].gram.T)  # finished: exactly symmetric


def test_linears_of_one_group_share_their_statistics():
    torch.manual_seed(0)
    block = Branches()
    hidden = torch.randn(4, 3, 6)
    stats, _ = group_statistics(block, [("q", "k"), ("o",)], hidden, {}, batch_size=3)
    assert stats["q"] is stats["k"]
    x = hidden.reshape(-1, 6).double()
    assert torch.allclose(stats["k"].gram, x.T @ x)
    with torch.no_grad():
        h = (torch.relu(block.q(hidden)) * block.k(hidden)).reshape(-1, 4).double()
    assert torch.allclose(stats["o"].gram, h.T @ h, atol=1e-6)


def test_group_statistics_after_an_earlier_group_was_replaced():
    """The cross term of a later group pairs the full-precision stream run through the originals with the
    compressed stream run through the replacements; the early stop changes nothing in the statistics."""
    torch.manual_seed(1)
    block = Branches()
    original_q = block.q
    replacement = torch.nn.Linear(6, 4)
    with torch.no_grad():
        replacement.weight.copy_(original_q.weight + 0.1 * torch.randn(4, 6))
        replacement.bias.copy_(original_q.bias)
    block.q = replacement
    hidden, fp_hidden = torch.randn(5, 3, 6), torch.randn(5, 3, 6)
    groups = [("o",)]
    tail_calls = []
    handle = block.tail.register_forward_pre_hook(lambda _m, args: tail_calls.append(args[0].shape[0]))
    try:
        stopped, none = group_statistics(block, groups, hidden, {}, fp_hidden, cross=True,
                                         originals={"q": original_q}, batch_size=2)
        assert none is None
        assert tail_calls == []  # both runs stopped at o's input
        full, fp_out = group_statistics(block, groups, hidden, {}, fp_hidden, cross=True, fp_outputs=True,
                                        originals={"q": original_q}, batch_size=2)
        assert sum(tail_calls) == len(fp_hidden)  # only the full-precision stream ran to the end
    finally:
        handle.remove()
    assert block.q is replacement  # the originals were put back only for the full-precision run
    with torch.no_grad():
        x_fp = (torch.relu(original_q(fp_hidden)) * block.k(fp_hidden)).reshape(-1, 4).double()
        x = (torch.relu(replacement(hidden)) * block.k(hidden)).reshape(-1, 4).double()
        block.q = original_q
        expected_out = block(fp_hidden)
        block.q = replacement
    assert not torch.allclose(x_fp, x)
    assert torch.allclose(stopped["o"].gram, x.T @ x, atol=1e-6)
    assert torch.allclose(stopped["o"].cross, (x_fp - x).T @ x, atol=1e-6)
    assert torch.equal(stopped["o"].gram, full["o"].gram)
    with torch.no_grad(), record_grams({"o": block.o}) as whole:  # the block run to its end, batch by batch
        for start in range(0, len(hidden), 2):
            block(hidden[start:start + 2])
    assert torch.equal(stopped["o"].gram, whole["o"].gram)
    assert torch.equal(stopped["o"].cross, full["o"].cross)
    assert torch.allclose(fp_out, expected_out)
    unpaired, _ = group_statistics(block, groups, hidden, {}, fp_hidden, cross=True, batch_size=2)
    assert not torch.allclose(unpaired["o"].cross, stopped["o"].cross, atol=1e-3)  # the originals mattered


def test_replays_keep_to_their_budget_and_drop_what_an_outer_replay_covers():
    from calibration import Replays

    replays = Replays(tokens=10, budget=10 * 4 * 120)  # room for 120 channels of outputs
    replays.add({"attn.q": 60})
    assert list(replays.outputs) == ["attn.q"]
    replays.add({"attn": 50, "attn.k": 10, "mlp.gate": 60})  # attn covers attn.k; no room left for gate
    assert list(replays.outputs) == ["attn.q", "attn"]        # attn.q serves attn's first (recording) run
    replays.add({"mlp.up": 60})  # attn.q is dropped now: room for up
    assert list(replays.outputs) == ["attn", "mlp.up"]


def test_a_gram_summed_in_row_blocks_up_to_the_diagonal_is_the_whole_gram(monkeypatch):
    import calibration.capture as capture

    monkeypatch.setattr(capture, "GRAM_BLOCK", 16)  # 40 channels: blocks of 16, 16 and 8 rows
    batches = [torch.randn(3, 7, 40, generator=torch.Generator().manual_seed(seed)) for seed in range(2)]
    for dtype in (torch.float64, torch.float32):
        accumulator = GramAccumulator(40, dtype=dtype)
        for batch in batches:
            accumulator.add(batch)
        x = torch.cat(batches).reshape(-1, 40).double()
        gram = accumulator.finish().gram
        assert torch.equal(gram, gram.T)
        torch.testing.assert_close(gram.double(), x.T @ x, rtol=1e-5, atol=1e-5)
