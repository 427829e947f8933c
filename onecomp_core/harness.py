"""lm-eval tasks on a loaded model: ``onecomp eval DIR --tasks ...`` wraps the quantized model
(and the FP reference) in lm-eval's HFLM and returns each task's metrics.

A task is a registered lm-eval name (``hellaswag``) or a path to a task YAML file, whose folder
is added to lm-eval's task search path and whose ``task:`` key names it; a YAML whose data
lives in local files (``dataset_path: json`` with ``dataset_kwargs.data_files``) needs no
network.
"""
from __future__ import annotations

from pathlib import Path

from .errors import OnecompError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise OnecompError("--tasks needs lm-eval: pip install 'onecomp-core[eval]' (or pip install lm-eval)") from None
    return lm_eval, HFLM, TaskManager


def task_names(specs: list[str]) -> tuple[list[str], list[str]]:
    """(task names, extra include folders) of ``specs``: names as given, YAML files by their ``task:``."""
    import yaml
    names, include = [], []
    for spec in specs:
        p = Path(spec).expanduser()
        if p.suffix in (".yaml", ".yml"):
            if not p.is_file():
                raise OnecompError(f"task file {p} does not exist; pass an lm-eval task name or an existing task YAML")
            try:
                doc = yaml.safe_load(p.read_text())
            except yaml.YAMLError as exc:
                raise OnecompError(f"task file {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("task"), str):
                raise OnecompError(f"task file {p} has no `task: NAME` key; lm-eval needs one")
            names.append(doc["task"])
            include.append(str(p.resolve().parent))
        else:
            names.append(spec)
    return names, sorted(set(include))


def run_tasks(model, tokenizer, specs: list[str], *, limit: int | None = None, num_fewshot: int | None = None,
              batch_size: int = 1) -> dict:
    """{task: {metric: value}} of lm-eval's harness on ``model`` (an in-memory transformers model)."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    names, include = task_names(specs)
    manager = TaskManager(include_path=include or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise OnecompError(f"lm-eval knows no task {unknown[0]!r}; pass a registered name or a task YAML file")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, device=str(next(model.parameters()).device),
              batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, num_fewshot=num_fewshot, task_manager=manager,
                                  log_samples=False, bootstrap_iters=0, verbosity="ERROR")
    results = out["results"] if out else {}
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "_stderr" not in k}
            for task, metrics in results.items()}
