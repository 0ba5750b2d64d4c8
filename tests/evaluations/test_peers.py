"""evaluations.peers without the peer packages: bits-per-weight accounting, the level check, the argument parsing
and the atomic OUT of a run (a fake quantizer stands in for the peers).

    .venv/bin/python -m pytest -q tests/evaluations/test_peers.py
    PEERS_VENV=/tmp/peers/venv .venv/bin/python -m pytest -q tests/evaluations/test_peers.py  # + the real peers
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evaluations import peers

SMOL = dict(rows=576, cols=576)  # SmolLM2-135M q_proj: width 576, not a multiple of 128


def test_row_groups_ragged_last_group_counts_a_whole_scale():
    # 576 = 4 * 128 + 64: 5 scales per row
    assert peers.layer_stored_bits(**SMOL, bits=4, group_size=128) == 576 * 576 * 4 + 576 * 5 * 16
    assert peers.bits_per_weight([dict(**SMOL, bits=4, group_size=128)]) == pytest.approx(4 + 5 * 16 / 576)
    assert peers.bits_per_weight([dict(**SMOL, bits=3, group_size=64)]) == pytest.approx(3 + 16 / 64)


def test_zero_points_and_g_idx():
    # asymmetric: a 16-bit zero per group too; act-order "group": a 32-bit g_idx per input column
    assert peers.bits_per_weight([dict(**SMOL, bits=4, group_size=64, zero_bits=16)]) == pytest.approx(4.5)
    bits = peers.layer_stored_bits(rows=576, cols=1536, bits=4, group_size=128, g_idx_bits=32)
    assert bits == 576 * 1536 * 4 + 576 * 12 * 16 + 1536 * 32
    assert bits / (576 * 1536) == pytest.approx(4.180555555)


def test_hqq_flat_groups_and_3bit_packing():
    # 576 * 576 / 128 = 2592 flat groups, each a fp16 scale and a fp16 zero; 4-bit codes two to a byte
    assert peers.bits_per_weight([dict(**SMOL, bits=4, group_size=128, zero_bits=16, grouping="flat",
                                       packing="hqq")]) == 4.25
    # 3-bit codes ten to an int32 along the 13824 groups of a 576 x 1536 weight: 1383 x 64 int32
    bits = peers.layer_stored_bits(rows=576, cols=1536, bits=3, group_size=64, zero_bits=16, grouping="flat",
                                   packing="hqq")
    assert bits == 1383 * 64 * 32 + 13824 * 32
    with pytest.raises(ValueError):
        peers.layer_stored_bits(rows=3, cols=5, bits=4, group_size=8, grouping="flat")


def test_unquantized_layers_count_at_their_bits():
    layers = [dict(rows=576, cols=1536, bits=4, group_size=128), dict(**SMOL, bits=16, group_size=None,
                                                                      grouping="none")]
    quantized = 576 * 1536 * (4 + 16 / 128)
    assert peers.bits_per_weight(layers) == pytest.approx((quantized + 576 * 576 * 16) / (576 * 1536 + 576 * 576))


def test_max_levels_rows_ragged_and_flat():
    w = torch.arange(4 * 10, dtype=torch.float32).reshape(4, 10) % 3  # rows of values in {0, 1, 2}
    assert peers.max_levels(w, 4) == 3
    w[0, 9] = 7.0  # in the ragged last group (columns 8, 9) of row 0
    assert peers.max_levels(w, 4) == 3
    w[0, 8] = 8.0
    assert peers.max_levels(w[:, 8:], 4) == 2
    assert peers.max_levels(w, 4, "flat") == 4  # flat groups of 4 wrap across rows; one holds 0, 1, 7, 8


def test_parser():
    args = peers.build_parser().parse_args(["run", "--method", "hqq", "--bits", "3", "--group-size", "64", "--model",
                                            "m", "--calib", "c.pt", "--out", "o", "--threads", "2"])
    assert (args.command, args.method, args.bits, args.group_size, args.threads) == ("run", "hqq", 3, 64, 2)
    assert (args.iters, args.lr, args.actorder) == (None, None, "static")
    with pytest.raises(SystemExit):
        peers.build_parser().parse_args(["run", "--method", "gptq", "--bits", "4", "--group-size", "128", "--model",
                                         "m", "--calib", "c", "--out", "o"])


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16, 8, bias=False)
        self.lm_head = torch.nn.Linear(8, 4, bias=False)


def fake_rtn(args, model, ids):
    """Round-to-nearest per row group, as a stand-in for a peer."""
    w = model.proj.weight.detach().reshape(8, -1, args.group_size)
    scale = w.abs().amax(-1, keepdim=True) / (2 ** (args.bits - 1) - 1)
    return dict(weights={"proj.weight": (torch.round(w / scale) * scale).reshape(8, 16)}, unquantized=[],
                layers=[dict(rows=8, cols=16, bits=args.bits, group_size=args.group_size)], seconds=(0.0, 0.0),
                symmetric=True, actorder=None, grouping="row", notes=[], call="fake")


def broken(args, model, ids):
    raise RuntimeError("the peer failed")


def run_args(tmp_path: Path, method: str):
    torch.save(torch.zeros(2, 8, dtype=torch.long), tmp_path / "ids.pt")
    return peers.build_parser().parse_args(["run", "--method", method, "--bits", "4", "--group-size", "8",
                                            "--model", str(tmp_path), "--calib", str(tmp_path / "ids.pt"), "--out",
                                            str(tmp_path / "out")])


def test_run_writes_out_atomically(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "_load_model", lambda path: Tiny())
    monkeypatch.setitem(peers.QUANTIZERS, "hqq", fake_rtn)
    result = peers.run(run_args(tmp_path, "hqq"))
    out = tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.pt", "out"]
    assert json.loads((out / "result.json").read_text()) == result
    assert result["bits_per_weight"] == 4 + 16 / 8 and result["layers"] == ["proj"]
    assert result["check"]["max_levels_per_group"] <= 16
    assert list(load_file(str(out / "weights.safetensors"))) == ["proj.weight"]

    monkeypatch.setitem(peers.QUANTIZERS, "hqq", broken)  # a failed rerun leaves neither OUT nor OUT.partial
    (out / "result.json").unlink()
    with pytest.raises(RuntimeError, match="the peer failed"):
        peers.run(run_args(tmp_path, "hqq"))
    assert not (tmp_path / "out.partial").exists()
    assert (out / "weights.safetensors").exists()  # the earlier OUT is only replaced by a finished run


def test_run_refuses_weights_that_are_not_quantized(tmp_path, monkeypatch):
    def identity(args, model, ids):
        found = fake_rtn(args, model, ids)
        found["weights"] = {"proj.weight": model.proj.weight.detach().clone()}
        return found

    monkeypatch.setattr(peers, "_load_model", lambda path: Tiny())
    monkeypatch.setitem(peers.QUANTIZERS, "autoround", identity)
    with pytest.raises(RuntimeError, match="distinct values|as they were"):
        peers.run(run_args(tmp_path, "autoround"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.pt"]


def test_run_peer_failure_raises_with_the_log_tail(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="missing.pt"):
        peers.run_peer(sys.executable, "hqq", 4, 64, tmp_path, tmp_path / "missing.pt", out, threads=1)
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert (tmp_path / "out.log").exists()


def test_run_peer_timeout_removes_the_partial_out(tmp_path):
    fake = tmp_path / "python"  # a "python" that starts writing OUT.partial and hangs
    fake.write_text('#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done\n'
                    'mkdir -p "$out.partial"\nexec sleep 30\n')
    fake.chmod(0o755)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="timeout"):
        peers.run_peer(fake, "hqq", 4, 64, tmp_path, tmp_path / "ids.pt", out, threads=1, timeout=1)
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_ensure_venv_returns_a_marked_venv_at_once(tmp_path, monkeypatch):
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    (tmp_path / "venv" / peers.MARKER).write_text("{}")
    monkeypatch.setattr(peers.subprocess, "run", lambda *a, **k: pytest.fail("ensure_venv ran a command"))
    assert peers.ensure_venv(tmp_path / "venv") == python


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PEERS_VENV"), reason="set PEERS_VENV to a peer venv (see ensure_venv)")
@pytest.mark.parametrize("method", peers.METHODS)
def test_peer_runs_on_a_tiny_llama(tmp_path, method):
    """The real peers on a 2-block Llama of width 128 and MLP 192 (a ragged last group at group size 128); ~35 s for
    the three: PEERS_VENV=/tmp/peers/venv .venv/bin/python -m pytest -q tests/evaluations/test_peers.py -k tiny"""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from compress.models import DEMO_DIR

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "tiny")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_DIR / name, tmp_path / "tiny" / name)
    torch.save(torch.randint(3, 4096, (4, 64)), tmp_path / "ids.pt")
    python = Path(os.environ["PEERS_VENV"]) / "bin" / "python"
    result = peers.run_peer(python, method, 4, 128, tmp_path / "tiny", tmp_path / "ids.pt", tmp_path / "out",
                            threads=1, iters=2 if method == "autoround" else None)
    assert result["check"]["max_levels_per_group"] <= 16 and result["check"]["changed_fraction"] > 0.9
    downs = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert result["unquantized"] == (downs if method == "llmcompressor-gptq" else [])
    assert len(result["layers"]) == 14 - len(result["unquantized"])
    assert sorted(peers.apply_peer_weights(model, tmp_path / "out")) == [n + ".weight" for n in result["layers"]]
