"""Streaming block by block from shards, resume after a kill, and numerical safety."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from calibration import group_statistics, record_grams
from calibration.capture import capture_block_inputs
from compress import GPTQ, METHODS, RTN, SVDLLM, LoRAP
from compress.architectures import LLAMA
from compress.cli import main
from compress.errors import CompressError
from compress.formats.native import load_compressed, save_compressed
from compress.pipeline import compress_model, compress_to_directory
from compress.recipe import Calibration, Recipe
from tests.conftest import tiny_llama

FAST = ["--nsamples", "8", "--seqlen", "32", "--no-eval-ppl", "--group-size", "32"]
CALIBRATION = Calibration(nsamples=8, seqlen=32)

# Runs the CLI, SIGKILLing itself at the N-th layer it compresses (0: never); prints how many it compressed.
KILLER = """
import os, signal, sys
import torch
torch.set_num_threads(2)
import compress.pipeline as pipeline
calls, kill_at, original = [0], int(sys.argv[1]), pipeline.compress_linear
def counting(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
pipeline.compress_linear = counting
from compress.cli import main
code = main(sys.argv[2:])
print("layers compressed:", calls[0])
sys.exit(code)
"""


def run_killer(kill_at: int, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *args], capture_output=True, text=True, env=env)


def output_files(directory) -> dict[str, bytes]:
    """Every file that defines the model; report.json's timings are left out."""
    files = {path.name: path.read_bytes() for path in directory.iterdir() if path.name not in ("report.json",)}
    report = json.loads((directory / "report.json").read_text())
    for key in ("seconds", "block_seconds"):
        report.pop(key)
    files["report.json"] = json.dumps(report, sort_keys=True).encode()
    return files


@pytest.mark.parametrize("recipe", [
    Recipe(factorize=SVDLLM(rank_budget=0.5), quantize=GPTQ(bits=4, group_size=32), calibration=CALIBRATION),
    Recipe(factorize=LoRAP(rank_budget=0.5), calibration=CALIBRATION),
], ids=["svd-llm+gptq", "lorap"])
def test_streamed_output_equals_the_in_memory_one(tiny_model_dir, tmp_path, recipe):
    in_memory = compress_model(str(tiny_model_dir), recipe, progress=False)
    save_compressed(in_memory, tmp_path / "memory")
    streamed = compress_to_directory(str(tiny_model_dir), recipe, tmp_path / "stream", progress=False)
    assert all(t.is_meta for t in streamed.model.state_dict().values())  # nothing stayed in memory
    assert len(list((tmp_path / "stream").glob("model-*-of-00003.safetensors"))) == 3  # 2 blocks + the rest
    expected = load_compressed(tmp_path / "memory").state_dict()
    got = load_compressed(tmp_path / "stream").state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert streamed.report["layers"] == in_memory.report["layers"]


def test_resume_after_sigkill_writes_identical_files(tiny_model_dir, tmp_path):
    args = ["--model", str(tiny_model_dir), "--rank-budget", "0.5", "--wbits", "4", "--quantize", "gptq"] + FAST
    whole = run_killer(0, args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    assert "layers compressed: 14" in whole.stdout
    out = tmp_path / "resumed"
    killed = run_killer(10, args + ["--out", str(out)])  # the 3rd layer of the 2nd block
    assert killed.returncode == -9 and not out.exists()
    assert (tmp_path / ".resumed.partial" / "block-00000.json").exists()
    resumed = run_killer(0, args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "layers compressed: 7" in resumed.stdout  # only the unfinished block was redone
    assert not (tmp_path / ".resumed.partial").exists()
    assert output_files(out) == output_files(tmp_path / "whole")


def test_cbq_resumes_inside_a_window_with_the_weights_it_learned(tiny_model_dir, tmp_path):
    # The tiny model's two blocks form one CBQ window: a kill in block 1 loses nothing learned, since block 0's
    # checkpoint carries block 1's learned weights; the resumed run must not learn them again.
    args = ["--model", str(tiny_model_dir), "--wbits", "4", "--quantize", "cbq", "--iterations", "3"] + FAST
    whole = run_killer(0, args + ["--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "resumed"
    killed = run_killer(9, args + ["--out", str(out)])  # the 2nd layer of block 1
    assert killed.returncode == -9 and (tmp_path / ".resumed.partial" / "block-00000.json").exists()
    record = json.loads((tmp_path / ".resumed.partial" / "block-00000.json").read_text())
    assert set(record["pending"]) == {"1"} and len(record["pending"]["1"]) == 7
    resumed = run_killer(0, args + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "layers compressed: 7" in resumed.stdout
    assert output_files(out) == output_files(tmp_path / "whole")


def test_resume_refuses_a_different_recipe(capsys, tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    work = tmp_path / ".o.partial"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"model": "something else"}))
    assert main(["--model", str(tiny_model_dir), "--wbits", "4", "--out", str(out), "--resume"] + FAST) == 2
    assert "different run" in capsys.readouterr().err and not out.exists()
    done = tmp_path / "done"  # a finished output and no interrupted run: refused before any work
    done.mkdir()
    assert main(["--model", str(tiny_model_dir), "--wbits", "4", "--out", str(done), "--resume"] + FAST) == 2
    assert "already exists" in capsys.readouterr().err


def broken_model_dir(tmp_path, demo_tokenizer, edit) -> str:
    model = tiny_llama(vocab_size=len(demo_tokenizer))
    with torch.no_grad():
        edit(model)
    model.save_pretrained(tmp_path / "broken")
    demo_tokenizer.save_pretrained(tmp_path / "broken")
    return str(tmp_path / "broken")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.model.layers[1].mlp.up_proj.weight.__setitem__((3, 5), float("nan")),
     "model.layers.1.mlp.up_proj: the weight holds 1 NaN"),
    (lambda m: m.model.embed_tokens.weight.__setitem__((slice(None), 0), float("inf")),
     "calibration inputs of the first block hold"),
    (lambda m: m.model.layers[0].post_attention_layernorm.weight.mul_(1e38), "outputs of block 0"),
    (lambda m: m.model.layers[0].mlp.down_proj.weight.mul_(1e30),
     "mlp.down_proj: the compressed weight is not finite"),
], ids=["nan-weight", "inf-embedding", "overflowing-block", "beyond-fp16-scales"])
def test_non_finite_values_are_refused_and_nothing_is_written(capsys, tmp_path, demo_tokenizer, edit, message):
    model_dir = broken_model_dir(tmp_path, demo_tokenizer, edit)
    out = tmp_path / "o"
    assert main(["--model", model_dir, "--wbits", "4", "--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and err.count("error") == 1 and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("method", ["svd", "svd-llm", "saes-svd", "eora", "gptq"])
def test_dead_channels_and_constant_windows_are_damped_and_reported(tmp_path, demo_tokenizer, method):
    # Zeroing the first norm's channels makes the q/k/v Gram singular; a window of one token repeated is reported.
    model = tiny_llama(vocab_size=len(demo_tokenizer))
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:8] = 0
    ids = torch.randint(0, len(demo_tokenizer), (4, 32), generator=torch.Generator().manual_seed(0))
    ids[1] = 0
    factorize = None if method == "gptq" else METHODS["factorize"][method][0](rank_budget=0.5)
    quantize = GPTQ(bits=4, group_size=32) if method == "gptq" else None
    result = compress_model(model, Recipe(factorize=factorize, quantize=quantize), calib=ids, progress=False)
    notes = "\n".join(result.report["notes"])
    assert "model.layers.0.self_attn.q_proj: 8 of 64 input channels were never active" in notes
    assert "calibration windows [1] are one token repeated" in notes
    assert all(torch.isfinite(t).all() for t in result.model.state_dict().values() if t.is_floating_point())
    logits = result.model(ids[:1]).logits
    assert torch.isfinite(logits).all()


def test_linears_reading_one_tensor_share_one_gram(demo_tokenizer):
    model = tiny_llama(vocab_size=len(demo_tokenizer))
    block = model.model.layers[0]
    linears = {name: layer for name, layer in block.named_modules() if isinstance(layer, torch.nn.Linear)}
    ids = torch.randint(0, 100, (3, 16), generator=torch.Generator().manual_seed(1))
    hidden, kwargs = capture_block_inputs(model, block, ids)
    stats, fp_out = group_statistics(block, list(LLAMA.groups), hidden, kwargs, hidden, fp_outputs=True,
                                     batch_size=2)
    assert sorted(stats) == sorted(linears)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"] and stats["mlp.down_proj"] is not stats["mlp.up_proj"]
    with record_grams(linears) as separate:
        reference = block(hidden, **kwargs)
    reference = reference[0] if isinstance(reference, tuple) else reference
    for name in linears:
        assert torch.allclose(stats[name].gram, separate[name].gram, rtol=1e-10, atol=1e-8)
    assert torch.allclose(fp_out, reference, atol=1e-6)


def test_a_truncated_block_file_is_refused_on_load(tiny_model_dir, tmp_path):
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), calibration=CALIBRATION)
    out = tmp_path / "o"
    compress_to_directory(str(tiny_model_dir), recipe, out, progress=False)
    shard = out / "model-00001-of-00003.safetensors"
    tensors = load_file(shard)
    tensors.pop(next(iter(tensors)))
    save_file(tensors, shard)
    with pytest.raises(CompressError, match="truncated or altered|corrupt"):
        load_compressed(out)


def fail_at_layer(monkeypatch, layer: int) -> None:
    """Make the `layer`-th compress_linear call (1-based) of the next run raise, as a crash in the middle of a
    block."""
    import compress.pipeline as pipeline

    calls, original = [0], pipeline.compress_linear

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == layer:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_linear", failing)


def state(directory) -> dict[str, torch.Tensor]:
    return load_compressed(directory).state_dict()


def test_a_run_that_fails_while_finishing_resumes_into_the_out_it_may_replace(tiny_model_dir, tmp_path):
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), calibration=CALIBRATION)
    compress_to_directory(str(tiny_model_dir), recipe, tmp_path / "fresh", progress=False)
    out = tmp_path / "o"
    out.mkdir()
    (out / "old.txt").write_text("an earlier output")

    def interrupted(directory, compressed):  # e.g. Ctrl-C during the perplexity of the finished output
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_to_directory(str(tiny_model_dir), recipe, out, overwrite=True, progress=False, extras=interrupted)
    work = tmp_path / ".o.partial"
    assert (work / "run.json").exists() and (work / "block-00001.json").exists() and (out / "old.txt").exists()
    compress_to_directory(str(tiny_model_dir), recipe, out, resume=True, progress=False)  # no --overwrite again
    assert not work.exists() and not (out / "old.txt").exists()
    expected, got = state(tmp_path / "fresh"), state(out)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


def test_resume_refuses_a_damaged_block_file_and_another_offload_setting(monkeypatch, tiny_model_dir, tmp_path):
    recipe = Recipe(quantize=RTN(bits=4, group_size=32), calibration=CALIBRATION)
    out, work = tmp_path / "o", tmp_path / ".o.partial"
    fail_at_layer(monkeypatch, 10)  # the 3rd layer of block 1
    with pytest.raises(RuntimeError, match="simulated"):
        compress_to_directory(str(tiny_model_dir), recipe, out, progress=False)
    monkeypatch.undo()
    with pytest.raises(CompressError, match="activations differ"):
        compress_to_directory(str(tiny_model_dir), recipe, out, offload=True, resume=True, progress=False)
    shard = work / "model-00001-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(CompressError, match="does not match its record"):
        compress_to_directory(str(tiny_model_dir), recipe, out, resume=True, progress=False)


def without(name: str):
    def remove(directory):
        for path in directory.glob(name):
            path.unlink()
    return remove


@pytest.mark.parametrize("break_it, extra, message", [
    (lambda directory: None, ["--device", "cuda:7"], "device 'cuda:7' is not usable here"),
    (without("config.json"), [], "cannot load the model's config or tokenizer"),
    (without("tokenizer*"), [], "cannot load the model's config or tokenizer"),
], ids=["absent-device", "no-config", "no-tokenizer"])
def test_bad_streaming_input_is_one_line_and_leaves_nothing(capsys, tmp_path, demo_tokenizer, break_it, extra,
                                                           message):
    model_dir = broken_model_dir(tmp_path, demo_tokenizer, lambda model: None)
    break_it(tmp_path / "broken")
    capsys.readouterr()  # save_pretrained's progress bar
    out = tmp_path / "o"
    assert main(["--model", model_dir, "--wbits", "4", "--out", str(out)] + extra + FAST) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists() and not (tmp_path / ".o.partial").exists()


def test_a_shard_missing_from_its_index_is_refused(tmp_path, demo_tokenizer):
    from compress.streaming import Shards

    model = tiny_llama(vocab_size=len(demo_tokenizer))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].unlink()
    with pytest.raises(CompressError, match=f"lacks shards its index names.*{shards[-1].name}"):
        Shards(tmp_path / "sharded")


def test_the_block_error_is_computed_window_by_window():
    from compress.pipeline import stream_error

    g = torch.Generator().manual_seed(0)
    fp_hidden = torch.randn(21, 16, 32, generator=g).half()
    hidden = (fp_hidden.float() + 0.01 * torch.randn(21, 16, 32, generator=g)).half()
    expected = ((hidden.float() - fp_hidden.float()).norm() / fp_hidden.float().norm()).item()
    assert stream_error(hidden, fp_hidden, windows=4) == pytest.approx(expected, rel=1e-6)


def test_a_16_bit_checkpoint_streams_its_linears_in_16_bits_with_float32_results(tmp_path, demo_tokenizer,
                                                                                   monkeypatch):
    """A bf16 checkpoint's linears stay bf16 in the streamed block (half a float32 copy's memory) and compute by an
    exact upcast: the files equal those of the model compressed in memory in float32."""
    import compress.pipeline as pipeline

    path = tmp_path / "bf16"
    tiny_llama(vocab_size=len(demo_tokenizer)).to(torch.bfloat16).save_pretrained(path)
    demo_tokenizer.save_pretrained(path)
    recipe = Recipe(quantize=GPTQ(bits=4, group_size=32), calibration=CALIBRATION)
    in_memory = compress_model(str(path), recipe, progress=False)
    save_compressed(in_memory, tmp_path / "memory")
    dtypes, original = [], pipeline.compress_linear

    def spy(name, linear, *args, **kwargs):
        dtypes.append(linear.weight.dtype)
        return original(name, linear, *args, **kwargs)

    monkeypatch.setattr(pipeline, "compress_linear", spy)
    streamed = compress_to_directory(str(path), recipe, tmp_path / "stream", progress=False)
    assert len(dtypes) == 14 and set(dtypes) == {torch.bfloat16}
    expected = load_compressed(tmp_path / "memory").state_dict()
    got = load_compressed(tmp_path / "stream").state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
    assert streamed.report["layers"] == in_memory.report["layers"]
