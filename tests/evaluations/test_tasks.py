"""`compress eval --tasks`: lm-eval's HFLM on a compressed model in memory, with the local task shipped offline."""
import json

from compress.cli import main
from compress.models import DEMO_DIR
from evaluations.harness import local_tasks
from evaluations.tasks.python_next_line.next_line import DATA, build_examples

FAST = ["--nsamples", "2", "--seqlen", "16", "--no-eval-ppl"]


def test_the_shipped_data_is_what_the_builder_writes():
    examples = build_examples((DEMO_DIR / "heldout.txt").read_text())
    assert [json.loads(line) for line in DATA.read_text().splitlines()] == examples
    assert "python_next_line" in local_tasks()


def test_examples_hide_the_right_line_among_lines_of_the_same_indentation():
    text = "\n".join(f"{'    ' * (i % 3)}value_{i} = compute({i}, {i * 7})" for i in range(200))
    examples = build_examples(text, count=20, context_lines=4, seed=3)
    assert examples == build_examples(text, count=20, context_lines=4, seed=3)
    lines = text.splitlines()
    labels = set()
    for example in examples:
        right = example["choices"][example["label"]]
        position = lines.index(right.rstrip("\n"))
        assert example["context"] == "\n".join(lines[position - 4: position]) + "\n"
        indents = {len(choice) - len(choice.lstrip()) for choice in example["choices"]}
        assert len(set(example["choices"])) == 4 and len(indents) == 1
        labels.add(example["label"])
    assert labels == {0, 1, 2, 3}


def test_eval_runs_a_local_task_on_a_compressed_model(capsys, tmp_path, tiny_model_dir):
    out = tmp_path / "w4"
    assert main(["--model", str(tiny_model_dir), "--wbits", "4", "--group-size", "32", "--out", str(out)] + FAST) == 0
    result_path = tmp_path / "eval.json"
    assert main(["eval", str(out), "--tasks", "python_next_line", "--limit", "6", "--batch-size", "8",
                 "--json", str(result_path)]) == 0
    assert "python_next_line (6 examples): acc" in capsys.readouterr().out
    result = json.loads(result_path.read_text())
    metrics = result["tasks"]["python_next_line"]
    assert 0 <= metrics["acc"] <= 1 and 0 <= metrics["acc_norm"] <= 1 and "acc_stderr" in metrics
    assert result["samples"] == {"python_next_line": 6} and result["limit"] == 6 and "perplexity" not in result


def test_eval_needs_something_to_do_and_known_tasks(capsys, tiny_model_dir):
    assert main(["eval", str(tiny_model_dir)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--tasks", "no_such_task"]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'no_such_task'" in err and "python_next_line" in err and "Traceback" not in err
