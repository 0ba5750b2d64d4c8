import json
import math
import os
import subprocess
import sys

import pytest

import compress.streaming as streaming
from compress import GPTQ, SVD, Recipe
from compress.cli import build_recipe, compress_parser, main
from compress.models import DEMO_DIR

FAST = ["--nsamples", "2", "--seqlen", "16", "--no-eval-ppl"]
W4 = ["--wbits", "4", "--group-size", "32"]  # the tiny model's widths are 64 and 160


def refuse(capsys, argv, message, out=None):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    # Progress bars may come first; the error is one line, the last, and no traceback.
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and err.splitlines()[-1].startswith("compress: error:"), err
    assert "Traceback" not in err
    assert message in errors[0], err
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}*"))


@pytest.mark.parametrize("model, message", [
    ("nosuchalias", "unknown model 'nosuchalias'"),
    ("./missing/dir", "'./missing/dir' does not exist"),
    ("meta-llama/NotCachedAnywhere-1B", "'meta-llama/NotCachedAnywhere-1B'"),
])
def test_bad_model_is_refused(capsys, tmp_path, model, message):
    refuse(capsys, ["--model", model, "--wbits", "4", "--out", str(tmp_path / "o")] + FAST, message, tmp_path / "o")


def test_offline_hub_id_says_to_pass_a_directory(capsys, tmp_path):
    refuse(capsys, ["--model", "org/not-cached", "--wbits", "4", "--out", str(tmp_path / "o")], "--model DIR")


@pytest.mark.parametrize("flags, message", [
    (["--rank-budget", "0"], "rank budget must be in (0, 1]"),
    (["--rank-budget", "1.5"], "rank budget must be in (0, 1]"),
    (["--wbits", "5"], "wbits must be one of 2, 3, 4, 8"),
    (["--wbits", "4", "--group-size", "1000"], "group size 1000 divides no layer"),
    (["--wbits", "4"], "group size 128 divides no layer"),
    (W4 + ["--calib", "/no/such/corpus.txt"], "cannot read text from '/no/such/corpus.txt'"),
    (["--wbits", "4", "--act-order"], "--act-order does not apply to --quantize rtn"),
    (["--rank-budget", "0.5", "--damp", "0.1"], "--damp does not apply to --quantize rtn"),
    ([], "nothing to do"),
])
def test_bad_settings_are_refused(capsys, tmp_path, tiny_model_dir, flags, message):
    out = tmp_path / "o"
    refuse(capsys, ["--model", str(tiny_model_dir), "--out", str(out)] + flags + FAST, message, out)


def test_a_stage_without_its_method_flag_takes_the_method_defaults():
    def recipe(*flags):
        return build_recipe(compress_parser().parse_args(["--model", "demo", *flags]))

    assert recipe("--factorize", "svd") == Recipe(factorize=SVD(rank_budget=0.5))
    assert recipe("--quantize", "gptq", "--act-order").quantize == GPTQ(act_order=True)
    assert recipe("--wbits", "3").quantize.group_size == 128
    assert recipe("--wbits", "3").true_sequential and not recipe("--wbits", "3", "--no-true-sequential").true_sequential


def test_unreadable_calibration_files_are_refused(capsys, tmp_path, tiny_model_dir):
    (tmp_path / "corpus.bin").write_bytes(b"\x00\x01")
    empty = tmp_path / "empty"
    empty.mkdir()
    for source, message in ((tmp_path / "corpus.bin", "use files of one kind"),
                            (empty, "no .txt, .jsonl or .parquet")):
        refuse(capsys, ["--model", str(tiny_model_dir), *W4, "--calib", str(source), "--out",
                        str(tmp_path / "o")] + FAST, message, tmp_path / "o")


def test_existing_out_needs_overwrite(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refuse(capsys, ["--model", str(tiny_model_dir), *W4, "--out", str(out)] + FAST, "already exists")
    assert (out / "keep.txt").read_text() == "mine"
    assert main(["--model", str(tiny_model_dir), *W4, "--out", str(out), "--overwrite"] + FAST) == 0
    assert not (out / "keep.txt").exists() and (out / "compression_config.json").exists()


def test_interrupted_write_leaves_nothing(capsys, tmp_path, tiny_model_dir, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(streaming, "save_file", interrupted)
    out = tmp_path / "o"
    assert main(["--model", str(tiny_model_dir), *W4, "--out", str(out)] + FAST) == 130
    assert "--resume" in capsys.readouterr().err
    assert not out.exists() and [path.name for path in tmp_path.iterdir()] == [".o.partial"]
    refuse(capsys, ["--model", str(tiny_model_dir), *W4, "--out", str(out)] + FAST, "pass --resume")


def test_recipe_file_runs_and_conflicts_with_flags(capsys, tmp_path, tiny_model_dir):
    first = tmp_path / "first"
    assert main(["--model", str(tiny_model_dir), "--rank-budget", "0.5", "--wbits", "8", "--group-size", "16",
                 "--no-true-sequential", "--gram-dtype", "float32", "--out", str(first)] + FAST) == 0
    recipe = Recipe.load(first / "recipe.yaml")
    assert not recipe.true_sequential and recipe.gram_dtype == "float32"
    again = tmp_path / "again"
    assert main(["--model", str(tiny_model_dir), "--recipe", str(first / "recipe.yaml"), "--no-eval-ppl", "--out",
                 str(again)]) == 0
    tensors = sorted(path.name for path in first.glob("*.safetensors"))
    assert tensors and tensors == sorted(path.name for path in again.glob("*.safetensors"))
    assert all((first / name).read_bytes() == (again / name).read_bytes() for name in tensors)
    refuse(capsys, ["--model", str(tiny_model_dir), "--recipe", str(first / "recipe.yaml"), "--wbits", "4",
                    "--out", str(tmp_path / "x")], "drop --wbits")
    refuse(capsys, ["--model", str(tiny_model_dir), "--recipe", str(first / "recipe.yaml"), "--no-true-sequential",
                    "--out", str(tmp_path / "x")], "drop --no-true-sequential")
    refuse(capsys, ["--model", str(tiny_model_dir), "--recipe", str(first / "recipe.yaml"), "--gram-dtype", "float64",
                    "--out", str(tmp_path / "x")], "drop --gram-dtype")


def factor_bits(model_dir, budget: float, bits: int, group_size: int) -> float:
    """Bits per weight of asymmetric `bits`-bit factors up (out, r) and down (r, in) of every decoder-block linear at
    the uniform ranks for `budget`, counted from the config's sizes and the format: int32 qweight
    (rows, ceil(cols/32)*bits), fp16 scales (rows, groups), int32 qzeros (groups, ceil(rows/32)*bits)."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = [(q, hidden), (kv, hidden), (kv, hidden), (hidden, q), (inter, hidden), (inter, hidden), (hidden, inter)]

    def packed(rows, cols):
        g = cols if group_size >= cols else max(d for d in range(1, group_size + 1) if cols % d == 0)
        return 32 * rows * math.ceil(cols / 32) * bits + 16 * rows * (cols // g) + \
            32 * (cols // g) * math.ceil(rows / 32) * bits

    stored = 0
    for out, inp in shapes:
        rank = max(1, math.floor(budget * out * inp / (out + inp)))
        stored += packed(out, rank) + packed(rank, inp)
    return stored / sum(out * inp for out, inp in shapes)  # every block alike: the ratio of one block


def test_console_script_end_to_end(tmp_path, tiny_model_dir):
    out = tmp_path / "o"
    text = tmp_path / "eval.txt"
    text.write_text((DEMO_DIR / "heldout.txt").read_text()[:6000])
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "compress.cli", "--model", str(tiny_model_dir), "--rank-budget", "0.5",
                          *W4, "--out", str(out), "--eval-ppl", str(text)] + FAST[:-1],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert f"wrote {out.resolve()}" in run.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["perplexity"]) >= {"original", "compressed"}
    # svd-llm factors at the uniform ranks for budget 0.5, both quantized by RTN to 4 bits in groups of 32
    assert report["bits_per_weight"] == factor_bits(tiny_model_dir, 0.5, 4, 32)
    assert (out / "ranks.png").stat().st_size > 0
    result = tmp_path / "ppl.json"
    run = subprocess.run([sys.executable, "-m", "compress.cli", "eval", str(out), "--ppl", str(text), "--seqlen", "32",
                          "--json", str(result)], capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(result.read_text())["perplexity"] > 1
    bad = subprocess.run([sys.executable, "-m", "compress.cli", "--model", "nosuchalias", "--wbits", "4"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_eval_reads_a_plain_model_directory(capsys, tmp_path, tiny_model_dir):
    text = tmp_path / "eval.txt"
    text.write_text((DEMO_DIR / "heldout.txt").read_text()[:4000])
    assert main(["eval", str(tiny_model_dir), "--ppl", str(text), "--seqlen", "32", "--json",
                 str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["seqlen"] == 32 and result["perplexity"] > 100  # random weights: near the vocabulary size
    refuse(capsys, ["eval", str(tmp_path / "nothing"), "--ppl", str(text)], "does not exist")
