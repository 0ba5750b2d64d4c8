import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from calibration import GramAccumulator, load_text, paired_statistics, record_grams, sample_windows
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
    assert load_text(tmp_path / "docs.jsonl", max_chars=10) == DOCS[0]


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


def test_paired_statistics_hold_both_streams():
    block = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 6))
    linears = {"first": block[0], "second": block[2]}
    hidden, fp_hidden = torch.randn(5, 3, 6), torch.randn(5, 3, 6)
    stats, fp_out = paired_statistics(block, linears, hidden, fp_hidden, {}, cross=True, batch_size=2)
    x, xf = hidden.reshape(-1, 6).double(), fp_hidden.reshape(-1, 6).double()
    assert torch.allclose(stats["first"].gram, x.T @ x)
    assert torch.allclose(stats["first"].cross, (xf - x).T @ x)
    h, hf = torch.relu(block[0](hidden)).reshape(-1, 4).double(), torch.relu(block[0](fp_hidden)).reshape(-1, 4).double()
    assert torch.allclose(stats["second"].gram, h.T @ h, atol=1e-6)
    assert torch.allclose(stats["second"].cross, (hf - h).T @ h, atol=1e-6)
    assert torch.allclose(fp_out, block(fp_hidden))
