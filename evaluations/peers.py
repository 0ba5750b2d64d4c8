"""Peer quantization tools run as their users run them: llm-compressor GPTQ, AutoRound and HQQ.

Each peer runs in its own virtual environment (its pins must not touch this project's), as a subprocess:

    python -m evaluations.peers run --method hqq --bits 4 --group-size 64 --model DIR --calib ids.pt --out OUT

It quantizes the model's decoder linears (never lm_head) with the peer's own entry point and defaults, and writes
OUT/weights.safetensors (the float32 dequantized weight of every quantized linear, under its module name, e.g.
`model.layers.0.self_attn.q_proj.weight`) and OUT/result.json (method, bits, group_size, symmetric, actorder,
seconds, bits_per_weight, layers, notes, versions, check). The benchmark then loads these weights into the original
model and scores every model with the same perplexity code on the same tokens (`apply_peer_weights`).

Two halves live here. The main-venv half (`ensure_venv`, `peer_versions`, `run_peer`, `apply_peer_weights`,
`bits_per_weight`, `max_levels`) imports only the standard library at module level; the peer-venv half (`main`,
`run`, the `_quantize_*` functions) imports the peer libraries lazily and nothing of this project, since the
peer venv has none of it.

What the peers do by default (llmcompressor 0.14.0.1 / compressed-tensors 0.19.0, auto-round 0.15.1,
hqq 0.2.8.post1), checked in their sources and on SmolLM2-135M:

- llm-compressor GPTQModifier: symmetric int (the W4A16/W3A16 presets), actorder "static" (an alias of
  "weight": columns processed in activation order, groups stay contiguous, no g_idx; "group" is deprecated and
  GPTQ refuses it), memoryless min-max observer computing the scales from the original weights before GPTQ,
  dampening_frac 0.01, block_size 128, pipeline "independent" which infers the sequential pipeline. A group that
  does not divide the input width is refused (ValueError; `bypass_divisibility_checks=True` crashes in the
  observer's unflatten), its error says to add those layers to `ignore`: we do that and keep them unquantized.
- AutoRound: SignRound, iters 200, lr 1/iters, min-max tuning, nsamples 128, seqlen 2048, batch 8, symmetric
  "full range" int (levels -2^(b-1)..2^(b-1)-1, no stored zero), fp16 scales; amp on a CPU casts the model to
  bfloat16 for tuning. A last group narrower than group_size is zero-padded: a ragged last group, one scale.
  The calibration rows are passed as a list of (1, seqlen) token tensors; it masks the last position of each.
- HQQ: asymmetric, axis 1, optimize (proximal) on, zero rounded at 4 bits only, scale and zero in fp16
  (compute_dtype), no calibration data. Its groups are consecutive group_size runs of the row-major flattened
  weight, so where group_size does not divide the width a group spans the end of one row and the start of the
  next. 3-bit codes are packed 10 to an int32 (3.2 bits each).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

PEER_PACKAGES = ["llmcompressor", "auto-round", "hqq"]
TORCH_VERSION = "2.13.0"
METHODS = ("llmcompressor-gptq", "autoround", "hqq")
REPO_ROOT = Path(__file__).resolve().parent.parent
MARKER = "peers-ready.json"
VERSION_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "auto-round", "hqq", "datasets",
                    "accelerate", "safetensors")
# the import names of PEER_PACKAGES, for the check that a venv works
_PEER_IMPORTS = ("llmcompressor", "auto_round", "hqq")
# (codes per word, bits per word) of HQQ's bit packing (hqq.core.quantize.Quantizer.bit_to_packing)
_HQQ_PACKING = {8: (1, 8), 4: (2, 8), 3: (10, 32), 2: (4, 8), 1: (8, 8)}


# ------------------------------------------------------------------------------------------------ main venv side

def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _venv_works(python: Path) -> bool:
    """Whether the venv's python imports torch TORCH_VERSION and every peer."""
    code = (f"import torch, {', '.join(_PEER_IMPORTS)}; "
            f"assert torch.__version__.startswith({TORCH_VERSION!r}), torch.__version__")
    try:
        return subprocess.run([str(python), "-c", code], capture_output=True, timeout=600).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def ensure_venv(path: Path) -> Path:
    """The python of the peer venv at `path`, made on first use (about 2 min): torch==TORCH_VERSION first, then
    PEER_PACKAGES with a constraints file pinning torch, so pip can never pull another torch. A venv that imports
    fine is returned at once; the marker file is written only after success, so a half-made venv is redone.
    A venv with the marker is not re-checked (the import check costs 10-40 s); one without it (made by hand, or
    half made) is checked once and marked, or made again."""
    path = Path(path)
    python = _venv_python(path)
    if python.exists() and ((path / MARKER).exists() or _venv_works(python)):
        if not (path / MARKER).exists():
            (path / MARKER).write_text(json.dumps(peer_versions(python), indent=1))
        return python
    print(f"peers: making the peer venv {path} (torch=={TORCH_VERSION}, {' '.join(PEER_PACKAGES)}; about 2 min)",
          flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(path)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    subprocess.run(pip + [f"torch=={TORCH_VERSION}"], check=True)
    constraints = path / "constraints.txt"
    constraints.write_text(f"torch=={TORCH_VERSION}\n")
    subprocess.run(pip + ["-c", str(constraints)] + PEER_PACKAGES, check=True)
    version = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert version.startswith(TORCH_VERSION), f"the peer venv has torch {version}, not {TORCH_VERSION}"
    if not _venv_works(python):
        raise RuntimeError(f"the peer venv {path} was made but does not import {', '.join(_PEER_IMPORTS)}")
    (path / MARKER).write_text(json.dumps(peer_versions(python), indent=1))
    return python


def peer_versions(python: Path | str) -> dict:
    """{package: version} inside the venv of `python` (None for a package it lacks)."""
    return json.loads(subprocess.run([str(python), "-c", _VERSIONS_CODE], capture_output=True, text=True,
                                     check=True).stdout)


_VERSIONS_CODE = (
    "import json, importlib.metadata as m\n"
    "def v(p):\n"
    "    try:\n"
    "        return m.version(p)\n"
    "    except m.PackageNotFoundError:\n"
    "        return None\n"
    f"print(json.dumps({{p: v(p) for p in {list(VERSION_PACKAGES)!r}}}))\n")


def peer_env(threads: int) -> dict:
    """The environment of a peer run: `threads` intra-op threads, no leaks of this venv, offline hub."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def run_peer(python: Path | str, method: str, bits: int, group_size: int, model_dir: Path | str,
             calib_ids_path: Path | str, out_dir: Path | str, threads: int, *, iters: int | None = None,
             lr: float | None = None, timeout: float | None = None) -> dict:
    """Runs `python -m evaluations.peers run ...` in the repo root and returns the result.json it wrote.

    Its stdout and stderr go to OUT.log (moved into OUT on success). On failure: RuntimeError with the last
    stderr lines; OUT is then absent. `iters`/`lr` are AutoRound's (None: its defaults)."""
    out_dir = Path(out_dir).resolve()
    log = out_dir.with_name(out_dir.name + ".log")
    cmd = [str(python), "-m", "evaluations.peers", "run", "--method", method, "--bits", str(bits), "--group-size",
           str(group_size), "--model", str(Path(model_dir).resolve()), "--calib", str(Path(calib_ids_path).resolve()),
           "--out", str(out_dir), "--threads", str(threads)]
    if iters is not None:
        cmd += ["--iters", str(iters)]
    if lr is not None:
        cmd += ["--lr", str(lr)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "w") as handle:
            returncode = subprocess.run(cmd, cwd=REPO_ROOT, env=peer_env(threads), stdout=handle,
                                        stderr=subprocess.STDOUT, timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        returncode = f"timeout after {timeout} s"
    if returncode != 0 or not (out_dir / "result.json").exists():
        # a child killed outright (timeout, SIGKILL) cannot clean up its OUT.partial: do it here
        shutil.rmtree(out_dir.with_name(out_dir.name + ".partial"), ignore_errors=True)
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        tail = "\n".join(line[-400:] for line in lines[-25:])
        raise RuntimeError(f"peer {method} W{bits} g{group_size} failed (exit {returncode}, log {log}):\n{tail}")
    shutil.move(str(log), out_dir / "run.log")
    return json.loads((out_dir / "result.json").read_text())


def apply_peer_weights(model, out_dir: Path | str) -> list[str]:
    """Copies OUT/weights.safetensors into `model` (names and shapes must match); returns the names copied."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(Path(out_dir) / "weights.safetensors"))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if name not in params:
                raise KeyError(f"{name} of {out_dir} is not a parameter of the model")
            if params[name].shape != value.shape:
                raise ValueError(f"{name}: {tuple(value.shape)} in {out_dir}, {tuple(params[name].shape)} in the model")
            params[name].copy_(value.to(params[name].dtype))
    return sorted(weights)


# ----------------------------------------------------------------------------------- bits and checks (both sides)

def layer_stored_bits(rows: int, cols: int, bits: int, group_size: int | None, *, scale_bits: int = 16,
                      zero_bits: int = 0, g_idx_bits: int = 0, grouping: str = "row", packing: str = "tight") -> int:
    """Bits a (rows, cols) weight takes as stored: codes + a scale (+ a zero) per group + g_idx per input column.

    grouping "row": groups of `group_size` columns within a row, a narrower last group counted as a whole one
    (ceil); "flat": consecutive runs of the row-major flattened weight (HQQ axis 1); "none": an unquantized weight
    of `bits` bits each. packing "tight": bits per code; "hqq": HQQ's packing (3-bit: 10 codes per int32)."""
    numel = rows * cols
    if grouping == "none":
        return numel * bits
    if grouping == "row":
        groups = rows * math.ceil(cols / group_size)
    elif grouping == "flat":
        if numel % group_size:
            raise ValueError(f"flat groups of {group_size} do not tile a {rows}x{cols} weight")
        groups = numel // group_size
    else:
        raise ValueError(f"unknown grouping {grouping!r}")
    if packing == "tight":
        code_bits = numel * bits
    elif packing == "hqq":
        if grouping != "flat":
            raise ValueError("HQQ packing is defined for its flat groups")
        per_word, word_bits = _HQQ_PACKING[bits]  # W_q is (groups, group_size), packed along the groups
        code_bits = math.ceil(groups / per_word) * group_size * word_bits
    else:
        raise ValueError(f"unknown packing {packing!r}")
    return code_bits + groups * (scale_bits + zero_bits) + cols * g_idx_bits


def bits_per_weight(layers: list[dict]) -> float:
    """Stored bits over weight count, summed over layers: dicts of `layer_stored_bits`' arguments."""
    total = sum(layer_stored_bits(**layer) for layer in layers)
    return total / sum(layer["rows"] * layer["cols"] for layer in layers)


def max_levels(weight, group_size: int, grouping: str = "row") -> int:
    """The most distinct values any group of a 2-D weight holds (groups as in `layer_stored_bits`)."""
    import torch

    w = weight.detach().float()
    if grouping == "flat":
        groups = [w.reshape(-1, group_size)]
    elif grouping == "row":
        full = w.shape[1] // group_size * group_size
        groups = [w[:, :full].reshape(-1, group_size)] if full else []
        if full < w.shape[1]:
            groups.append(w[:, full:])
    else:
        raise ValueError(f"unknown grouping {grouping!r}")
    most = 0
    for g in groups:
        s = torch.sort(g, dim=1).values
        most = max(most, int((1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)).max()))
    return most


# ------------------------------------------------------------------------------------------------ peer venv side

def target_linears(model) -> dict:
    """{name: nn.Linear} of the decoder linears every peer quantizes: all Linear modules but lm_head."""
    import torch

    return {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"}


def _load_model(model_dir: str, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or torch.float32).eval()


def _count_rows_seen(seen: list, ids) -> int:
    """How many calibration rows appear among the token rows the model's embedding saw."""
    rows = {tuple(r.tolist()) for batch in seen for r in batch.reshape(-1, batch.shape[-1])}
    return sum(tuple(r.tolist()) in rows for r in ids)


def _quantize_llmcompressor(args, model, ids) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from llmcompressor.pipelines.registry import CalibrationPipeline

    linears = target_linears(model)
    # llm-compressor refuses a group that does not divide a layer's width (and its bypass crashes): it says to
    # add those layers to `ignore`, which keeps them unquantized.
    indivisible = [n for n, m in linears.items() if m.in_features % args.group_size]
    if len(indivisible) == len(linears):
        raise ValueError(f"llm-compressor refuses group size {args.group_size}: it divides no layer's width")
    # the modifier's actorder default (a sentinel for "static") applies unless it is given; None turns it off
    actorder = {} if args.actorder == "static" else {"actorder": None}
    recipe = GPTQModifier(
        targets="Linear", ignore=["lm_head", *indivisible], **actorder,
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": args.bits, "type": "int", "symmetric": True, "strategy": "group",
            "group_size": args.group_size}}})
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].detach().cpu()))
    pipeline = CalibrationPipeline._infer_pipeline([recipe])
    start, cpu = time.time(), time.process_time()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    seconds = (time.time() - start, time.process_time() - cpu)
    hook.remove()
    quantized = {n: m for n, m in linears.items() if n not in indivisible}
    weights, layers = {}, []
    for name, module in quantized.items():
        scheme = module.quantization_scheme.weights
        assert scheme.symmetric and scheme.num_bits == args.bits and scheme.group_size == args.group_size
        order = getattr(scheme.actorder, "value", scheme.actorder)  # "static", "weight", "group" or None
        weights[name + ".weight"] = module.weight.detach().float().cpu().clone()
        layers.append(dict(rows=module.out_features, cols=module.in_features, bits=args.bits,
                           group_size=args.group_size, g_idx_bits=32 if order in ("group", "dynamic") else 0))
    layers += [dict(rows=linears[n].out_features, cols=linears[n].in_features, bits=16, group_size=None,
                    grouping="none") for n in indivisible]
    notes = [f"oneshot pipeline 'independent' -> {pipeline}",
             f"observer {scheme.observer}, actorder {order}, dampening_frac {recipe.dampening_frac}, "
             f"block_size {recipe.block_size}",
             f"calibration rows seen by the embedding: {_count_rows_seen(seen, ids)}/{ids.shape[0]}, "
             f"lengths {sorted({int(s.shape[-1]) for s in seen})}",
             f"scales stored in the model dtype ({module.weight_scale.dtype}); counted as 16 bits"]
    if indivisible:
        notes.append(f"{len(indivisible)} linears with a width not divisible by {args.group_size} are refused by "
                     "llm-compressor (ValueError; bypass_divisibility_checks crashes): kept unquantized as its error "
                     "advises (`ignore`), counted at 16 bits")
    if recipe._rtn_fallback_module_names:
        notes.append(f"RTN fallback (Hessian not PD): {recipe._rtn_fallback_module_names}")
    return dict(weights=weights, layers=layers, unquantized=indivisible, seconds=seconds, symmetric=True,
                actorder=order, grouping="row", notes=notes,
                call=f"oneshot(model, dataset=Dataset(input_ids, attention_mask), recipe=GPTQModifier("
                     f"targets='Linear', ignore=['lm_head', +{len(indivisible)} indivisible], config_groups="
                     f"{{int{args.bits} symmetric group {args.group_size}}}{', actorder=None' if actorder else ''}), "
                     f"num_calibration_samples={ids.shape[0]}, max_seq_length={ids.shape[1]}, "
                     "shuffle_calibration_samples=False)")


def _quantize_autoround(args, model, ids) -> dict:
    import torch
    from auto_round import AutoRound
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    linears = target_linears(model)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, a, o: seen.append(a[0].detach().cpu()))
    kwargs = {} if args.iters is None else {"iters": args.iters}
    if args.lr is not None:
        kwargs["lr"] = args.lr
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group_size, sym=True,
                        dataset=[row.unsqueeze(0) for row in ids], nsamples=ids.shape[0], seqlen=ids.shape[1],
                        device_map="cpu", **kwargs)
    start, cpu = time.time(), time.process_time()
    rounder.quantize()
    seconds = (time.time() - start, time.process_time() - cpu)
    hook.remove()
    weights, layers, worst = {}, [], 0.0
    maxq = 2 ** (args.bits - 1)
    for name, module in linears.items():
        # the tuned weight AutoRound leaves in the layer is scale * q in the tuning dtype (bf16 on a CPU); the
        # format it exports serves q * scale with q integer and scale fp16: recover q and rebuild that exactly
        scale = module.scale.float()
        rows, cols = module.weight.shape
        pad = scale.shape[1] * args.group_size - cols
        w = torch.nn.functional.pad(module.weight.detach().float(), (0, pad)).reshape(rows, -1, args.group_size)
        q = torch.round(w / scale.unsqueeze(-1))
        assert q.min() >= -maxq and q.max() <= maxq - 1, f"{name}: codes outside [{-maxq}, {maxq - 1}]"
        dequant = (q * scale.unsqueeze(-1)).reshape(rows, -1)[:, :cols]
        worst = max(worst, float(((dequant - module.weight.float()).abs() / dequant.abs().clamp_min(1e-8)).max()))
        weights[name + ".weight"] = dequant.contiguous()
        layers.append(dict(rows=rows, cols=cols, bits=args.bits, group_size=args.group_size))
    config = rounder.quantize_config if hasattr(rounder, "quantize_config") else None
    details = {k: getattr(config, k, None) for k in ("iters", "lr", "minmax_lr", "enable_minmax_tuning",
                                                     "gradient_accumulate_steps", "nblocks")}
    pad_id = getattr(tokenizer, "pad_token_id", None)
    batch_size = getattr(getattr(rounder, "calibration_context", None), "batch_size", None)
    notes = [f"SignRound {details}, batch_size {batch_size}, "
             f"tuning dtype {getattr(getattr(rounder, 'model_context', None), 'amp_dtype', None)}, "
             f"scale dtype {module.scale.dtype}",
             f"calibration rows seen by the embedding: {_count_rows_seen(seen, ids)}/{ids.shape[0]}; "
             f"tokens equal to the pad id {pad_id} (masked by AutoRound): "
             f"{int((ids == pad_id).sum()) if pad_id is not None else 'no pad id: trailing repeats are masked'}",
             f"weights rebuilt as q * fp16 scale from the tuned weights: max relative gap {worst:.2e}"]
    if any(m.in_features % args.group_size for m in linears.values()):
        notes.append(f"width not divisible by {args.group_size}: AutoRound zero-pads the last group (ragged last "
                     "group with its own scale)")
    return dict(weights=weights, layers=layers, unquantized=[], seconds=seconds, symmetric=True, actorder=None,
                grouping="row", notes=notes,
                call=f"AutoRound(model, tokenizer, bits={args.bits}, group_size={args.group_size}, sym=True, "
                     f"dataset=[{ids.shape[0]} x (1, {ids.shape[1]}) ids], nsamples={ids.shape[0]}, "
                     f"seqlen={ids.shape[1]}, device_map='cpu'{''.join(f', {k}={v}' for k, v in kwargs.items())})"
                     ".quantize()")


def _quantize_hqq(args, model, ids) -> dict:
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from hqq.models.hf.base import AutoHQQHFModel

    linears = {n: (m.out_features, m.in_features) for n, m in target_linears(model).items()}
    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    start, cpu = time.time(), time.process_time()
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float16, device="cpu")
    seconds = (time.time() - start, time.process_time() - cpu)
    weights, layers = {}, []
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            meta = module.meta
            assert meta["nbits"] == args.bits and meta["group_size"] == args.group_size and meta["axis"] == 1
            weights[name + ".weight"] = module.dequantize().float().cpu().contiguous()
            rows, cols = linears[name]
            layers.append(dict(rows=rows, cols=cols, bits=args.bits, group_size=args.group_size, grouping="flat",
                               packing="hqq", zero_bits=16))
    params = config["weight_quant_params"]
    notes = [f"weight_quant_params {params}; scale and zero {meta['scale'].dtype} per group (zero not quantized)",
             "no calibration data"]
    if any(cols % args.group_size for _, cols in linears.values()):
        notes.append(f"width not divisible by {args.group_size}: HQQ groups runs of the flattened weight, so "
                     "groups wrap across rows")
    unquantized = sorted(set(linears) - {n[: -len(".weight")] for n in weights})
    return dict(weights=weights, layers=layers, unquantized=unquantized, seconds=seconds, symmetric=False,
                actorder=None, grouping="flat", notes=notes,
                call=f"AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits={args.bits}, "
                     f"group_size={args.group_size}), compute_dtype=torch.float16, device='cpu'); "
                     "HQQLinear.dequantize()")


QUANTIZERS = {"llmcompressor-gptq": _quantize_llmcompressor, "autoround": _quantize_autoround, "hqq": _quantize_hqq}


def _versions() -> dict:
    import importlib.metadata as metadata

    found = {}
    for package in VERSION_PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def run(args: argparse.Namespace) -> dict:
    """Quantizes with args.method, checks the result and writes OUT atomically (OUT.partial, then a rename)."""
    for path in (args.calib, args.model):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path} does not exist")
    import torch
    from safetensors.torch import save_file

    start = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        ids = torch.load(args.calib)
        if ids.dim() != 2:
            raise ValueError(f"{args.calib}: calibration ids must be (nsamples, seqlen), got {tuple(ids.shape)}")
        model = _load_model(args.model)
        originals = {n + ".weight": m.weight.detach().clone() for n, m in target_linears(model).items()}
        found = QUANTIZERS[args.method](args, model, ids)
        weights = found["weights"]
        if not weights:
            raise RuntimeError(f"{args.method} quantized no layer")
        levels = max(max_levels(w, args.group_size, found["grouping"]) for w in weights.values())
        if levels > 2 ** args.bits:
            raise RuntimeError(f"{args.method}: a group holds {levels} distinct values, more than 2**{args.bits}")
        diff = sum(float((w - originals[n]).pow(2).sum()) for n, w in weights.items())
        norm = sum(float(originals[n].pow(2).sum()) for n in weights)
        changed = sum(int((w != originals[n]).sum()) for n, w in weights.items())
        if changed == 0:
            raise RuntimeError(f"{args.method} left the weights as they were")
        save_file(weights, str(partial / "weights.safetensors"))
        quantized_layers = [layer for layer in found["layers"] if layer.get("grouping") != "none"]
        result = {
            "method": args.method, "bits": args.bits, "group_size": args.group_size,
            "symmetric": found["symmetric"], "actorder": found["actorder"],
            "seconds": {"quantize": round(found["seconds"][0], 2), "quantize_cpu": round(found["seconds"][1], 2),
                        "total": round(time.time() - start, 2)},
            "bits_per_weight": bits_per_weight(found["layers"]),
            "bits_per_weight_quantized": bits_per_weight(quantized_layers),
            "layers": sorted(n[: -len(".weight")] for n in weights), "unquantized": found["unquantized"],
            "calibration": {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}
            if args.method != "hqq" else None,
            "call": found["call"], "notes": found["notes"], "versions": _versions(),
            "check": {"max_levels_per_group": levels, "grouping": found["grouping"],
                      "relative_frobenius_error": math.sqrt(diff / norm),
                      "changed_fraction": changed / sum(w.numel() for w in weights.values())},
            "threads": torch.get_num_threads(),
        }
        (partial / "result.json").write_text(json.dumps(result, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m evaluations.peers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="quantize with a peer (inside the peer venv) and write OUT")
    r.add_argument("--method", required=True, choices=METHODS)
    r.add_argument("--bits", required=True, type=int)
    r.add_argument("--group-size", required=True, type=int)
    r.add_argument("--model", required=True, help="a transformers model folder")
    r.add_argument("--calib", required=True, help="(nsamples, seqlen) token ids saved with torch.save")
    r.add_argument("--out", required=True)
    r.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    r.add_argument("--iters", type=int, default=None, help="AutoRound iters (default: its 200; 50 = its light)")
    r.add_argument("--lr", type=float, default=None, help="AutoRound lr (default: 1/iters; light: 5e-3)")
    r.add_argument("--actorder", default="static", choices=("static", "none"),
                   help="llm-compressor GPTQ activation order (default: its default, static)")
    return parser


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)  # unwinds through run(), which removes OUT.partial


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        result = run(args)
        print(json.dumps({k: result[k] for k in ("method", "bits", "group_size", "seconds", "bits_per_weight")}))


if __name__ == "__main__":
    main()
