"""lm-evaluation-harness tasks on a model in memory (lm_eval's HFLM): hub tasks when online, local ones offline.

Local task definitions (YAML + data) live in evaluations/tasks and are found with TaskManager(include_path=...).
"""
from __future__ import annotations

from functools import cache
from pathlib import Path

from compress.errors import CompressError

LOCAL_TASKS = Path(__file__).resolve().parent / "tasks"


@cache
def task_manager():
    """lm-eval's index of its own tasks and the local ones (built once: it reads thousands of YAML files)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS))


def local_tasks() -> list[str]:
    """Names of the tasks defined under evaluations/tasks."""
    return sorted(path.stem for path in LOCAL_TASKS.glob("*/*.yaml"))


def run_tasks(model, tokenizer, tasks: list[str], limit: int | None = None, batch_size: int = 16,
              num_fewshot: int | None = None) -> dict:
    """{'tasks': {task: {metric: value}}, 'limit', 'num_fewshot', 'lm_eval'} from lm_eval.simple_evaluate.

    Metric names lose lm-eval's ',none' filter suffix: {'acc': 0.61, 'acc_stderr': 0.02, 'acc_norm': ...}.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = task_manager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise CompressError(f"unknown lm-eval task {unknown[0]!r}; local tasks: {', '.join(local_tasks())} "
                            "(hub tasks: lm-eval --tasks list)")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        output = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, num_fewshot=num_fewshot,
                                         task_manager=manager, log_samples=False, verbosity="WARNING")
    except (OSError, ConnectionError) as exc:  # datasets raises these (or subclasses) for data it cannot fetch
        raise CompressError(f"cannot load the data of {', '.join(tasks)} (hub tasks need the network or a "
                            f"datasets cache; local tasks: {', '.join(local_tasks())}): "
                            f"{str(exc).splitlines()[0]}") from None
    results = {task: {metric.removesuffix(",none"): value for metric, value in metrics.items()
                      if metric not in ("alias", "sample_len") and isinstance(value, (int, float))}
               for task, metrics in output["results"].items()}
    samples = {task: counts.get("effective") for task, counts in output.get("n-samples", {}).items()}
    return {"tasks": results, "samples": samples, "limit": limit, "num_fewshot": num_fewshot,
            "lm_eval": lm_eval.__version__}


def summary(result: dict) -> str:
    """One line per task: its accuracy metrics with their standard errors."""
    lines = []
    for task, metrics in result["tasks"].items():
        shown = [f"{name} {value:.4f}" + (f" ± {metrics[name + '_stderr']:.4f}" if f"{name}_stderr" in metrics else "")
                 for name, value in metrics.items() if not name.endswith("_stderr")]
        lines.append(f"{task} ({result['samples'].get(task)} examples): " + ", ".join(shown))
    return "\n".join(lines)
