"""Evaluation with lm-eval-harness: tasks, candidates (base, sources, merge), the runner and the report.

Importing this package is cheap: torch, transformers, PEFT, lm-eval and matplotlib are imported when used.

    >>> from loracook.evaluation import (EvalOptions, base_candidate, adapter_candidates, evaluate_candidates,
    ...     load_model, resolve_tasks)                                               # doctest: +SKIP
    >>> tasks = resolve_tasks(["./tasks/"], recipe_dir)  # validates; raises BadInput  # doctest: +SKIP
    >>> base = load_model(base_dir)  # doctest: +SKIP
    >>> report = evaluate_candidates([base_candidate(base), *adapter_candidates(base, {"med": med_dir})],
    ...                              tasks, EvalOptions(limit=20))  # doctest: +SKIP
    >>> report.save(out / "eval_results.json"); report.plot(out / "eval_results.png")  # doctest: +SKIP
"""

from loracook.evaluation.candidates import (
    AdapterWeights,
    Candidate,
    LoadedModel,
    adapter_candidates,
    adapter_folder_candidate,
    base_candidate,
    check_chat_template,
    folder_candidate,
    load_model,
    model_candidate,
    path_candidate,
)
from loracook.evaluation.offline import ensure_offline
from loracook.evaluation.report import CandidateInfo, EvalReport, MetricRow, Score, TaskInfo
from loracook.evaluation.runner import EvalEvent, EvalOptions, evaluate_candidates, evaluate_model
from loracook.evaluation.tasks import ResolvedTask, TaskSet, builtin_metrics, resolve_tasks

__all__ = [
    "AdapterWeights",
    "Candidate",
    "CandidateInfo",
    "EvalEvent",
    "EvalOptions",
    "EvalReport",
    "LoadedModel",
    "MetricRow",
    "ResolvedTask",
    "Score",
    "TaskInfo",
    "TaskSet",
    "adapter_candidates",
    "adapter_folder_candidate",
    "base_candidate",
    "builtin_metrics",
    "check_chat_template",
    "ensure_offline",
    "evaluate_candidates",
    "evaluate_model",
    "folder_candidate",
    "load_model",
    "model_candidate",
    "path_candidate",
    "resolve_tasks",
]
