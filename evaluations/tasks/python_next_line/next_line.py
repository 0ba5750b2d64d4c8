"""Data of the local task `python_next_line`: pick the real next line of a Python snippet among four.

    python -m evaluations.tasks.python_next_line.next_line   # rebuilds data.jsonl from compress/demo/heldout.txt
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data.jsonl"
HELDOUT = Path(__file__).resolve().parents[3] / "compress" / "demo" / "heldout.txt"


def candidate(line: str) -> bool:
    """A line worth predicting: real code of moderate length, not a comment."""
    text = line.strip()
    return 12 <= len(text) <= 100 and not text.startswith(("#", '"""', "'''"))


def build_examples(text: str, count: int = 500, context_lines: int = 8, choices: int = 4, seed: int = 0) -> list[dict]:
    """`count` examples {id, context, choices, label}, the same for the same text and seed.

    context: the `context_lines` lines before a candidate line; choices: that line and `choices - 1` other candidate
    lines of the text, each given the right line's indentation so that indentation alone does not tell them apart.
    """
    lines = text.splitlines()
    positions = [i for i in range(context_lines, len(lines)) if candidate(lines[i])]
    pool = sorted({lines[i].strip() for i in positions})
    rng = random.Random(seed)
    examples = []
    for i in sorted(rng.sample(positions, count)):
        right = lines[i]
        indent = right[: len(right) - len(right.lstrip())]
        wrong = set()
        while len(wrong) < choices - 1:
            line = rng.choice(pool)
            if line != right.strip():
                wrong.add(indent + line)
        options = [right] + sorted(wrong)
        rng.shuffle(options)
        examples.append({"id": len(examples), "context": "\n".join(lines[i - context_lines: i]) + "\n",
                         "choices": [option + "\n" for option in options], "label": options.index(right)})
    return examples


def load(**kwargs):
    """lm-eval's custom_dataset hook: {'test': Dataset} from data.jsonl (keyword arguments are task metadata)."""
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    return DatasetDict({"test": Dataset.from_list(rows)})


if __name__ == "__main__":
    examples = build_examples(HELDOUT.read_text())
    DATA.write_text("".join(json.dumps(example) + "\n" for example in examples))
    print(f"wrote {len(examples)} examples to {DATA}")
