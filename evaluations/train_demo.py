"""Train the bundled `demo` model: a small Llama-3-shaped causal LM on the Python standard library.

Run from the repository root:  python -m evaluations.train_demo [--steps N]
It writes compress/demo/ (fp16 safetensors, tokenizer, calibration and held-out texts, training record).
The data are the `.py` sources of the running interpreter's standard library: every Debian + Python
machine has them. Files are split by a hash of their path (1 in 10 held out), so the held-out text
never appears in training or calibration.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_DIR = Path(__file__).resolve().parent.parent / "compress" / "demo"
EOS = "<|endoftext|>"


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3")
    files = [p for p in root.rglob("*.py") if not any(part in skip for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def split_corpus() -> tuple[list[str], list[str]]:
    """Training and held-out documents, split by a hash of the file's path inside the stdlib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in stdlib_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        digest = hashlib.sha1(str(path.relative_to(root)).encode()).digest()[0]
        (heldout if digest % 10 == 0 else train).append(text)
    return train, heldout


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def take_chars(docs: list[str], limit: int) -> str:
    out, size = [], 0
    for doc in docs:
        if size >= limit:
            break
        out.append(doc[: limit - size])
        size += len(out[-1])
    return "\n\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)

    train_docs, heldout_docs = split_corpus()
    # Calibration text comes from the training split, the evaluation text from the held-out split.
    (args.out / "calibration.txt").write_text(take_chars(train_docs[::7], 400_000))
    (args.out / "heldout.txt").write_text(take_chars(heldout_docs, 400_000))

    tokenizer = train_tokenizer(train_docs, args.vocab)
    tokenizer.model_max_length = args.seqlen
    tokenizer.save_pretrained(args.out)
    ids = torch.tensor(tokenizer(f"\n\n{EOS}".join(train_docs))["input_ids"], dtype=torch.long)
    heldout_ids = torch.tensor(tokenizer((args.out / "heldout.txt").read_text())["input_ids"])
    print(f"train tokens {ids.numel():,}  held-out tokens {heldout_ids.numel():,}")

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 128,
        max_position_embeddings=args.seqlen, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    schedule = lambda step: (min(1.0, (step + 1) / warmup)
                             * 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - args.seqlen - 1, (args.batch,), generator=generator)
        batch = torch.stack([ids[s: s + args.seqlen] for s in starts.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - start:7.0f}s", flush=True)

    model.eval()
    model.half().save_pretrained(args.out, safe_serialization=True)
    model.float()
    with torch.no_grad():
        n = heldout_ids.numel() // args.seqlen
        windows = heldout_ids[: n * args.seqlen].view(n, args.seqlen)
        nll = sum(model(input_ids=w[None], labels=w[None]).loss.item() for w in windows) / n
    record = {"steps": args.steps, "batch": args.batch, "seqlen": args.seqlen, "lr": args.lr, "seed": args.seed,
              "train_tokens": ids.numel(), "heldout_tokens": heldout_ids.numel(),
              "parameters": sum(p.numel() for p in model.parameters()),
              "heldout_perplexity": math.exp(nll), "seconds": round(time.time() - start), "torch": torch.__version__,
              "python_stdlib": sysconfig.get_paths()["stdlib"]}
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
