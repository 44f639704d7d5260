"""What a candidate is scored on: few-shot examples (LoraHub's cross-entropy) or lm-eval tasks on a dev split.

Every input is checked by :func:`check_objective` before any model is loaded or any study folder is made, so a
bad file is one line and nothing is left behind. :func:`build_objective` then binds the checked inputs to the
resident model; calling the result scores whatever the model currently computes.

- ``examples``: one JSONL file, or a list of them (one objective per file), of ``{"input", "output"}`` lines;
  the score is :class:`loracook.objective.ExamplesObjective` (mean cross-entropy of the output tokens, lower is
  better), on the first ``limit`` lines.
- ``tasks``: each task's primary metric (its first metric) on ``limit`` items of ``split``, one objective per
  task. The test split is refused unless ``allow_test_split`` (mergekit-evolve has the same guard).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracook.errors import BadInput

LOC = ("search", "objective")


@dataclass(frozen=True)
class Objectives:
    """The checked objective inputs: names, directions (minimize / maximize), and what to score on."""

    names: tuple[str, ...]
    directions: tuple[str, ...]
    examples: tuple[tuple[Path, list[tuple[str, str]]], ...] = ()
    tasks: Any = None  # a TaskSet rewritten to the chosen split
    metrics: tuple[str, ...] = ()
    options: dict = field(default_factory=dict)

    @property
    def signs(self) -> tuple[float, ...]:
        """+1 where higher is better: a score to maximise is value · sign."""
        return tuple(1.0 if d == "maximize" else -1.0 for d in self.directions)

    def digest(self) -> str:
        """A hash of exactly what a trial is scored on: the examples' rows (after ``limit``), or each task's
        config on the chosen split with its local data files' bytes, and the scoring options. A study resumed
        after any of them changed would mix scores of different objectives under one name."""
        h = hashlib.sha256()
        for path, rows in self.examples:
            h.update(json.dumps([path.name, rows]).encode())
        for task in self.tasks.tasks if self.tasks is not None else ():
            config = copy.deepcopy(dict(task.config))
            files = (config.get("dataset_kwargs") or {}).get("data_files")
            # the files' bytes, not their paths: a moved recipe folder still resumes
            if isinstance(files, dict):
                config["dataset_kwargs"]["data_files"] = {
                    k: _file_digest(v) for k, v in sorted(files.items())
                }
            h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update(json.dumps({k: self.options[k] for k in sorted(self.options) if k != "batch_size"}).encode())
        return h.hexdigest()[:16]


def check_objective(objective) -> Objectives:
    """Read and check the objective's files (examples, task YAMLs); no model is loaded."""
    if objective.examples is not None:
        files = objective.examples if isinstance(objective.examples, list) else [objective.examples]
        examples = tuple(
            (Path(f), _read_examples(Path(f), index, len(files))) for index, f in enumerate(files)
        )
        examples = tuple((f, rows[: objective.limit] if objective.limit else rows) for f, rows in examples)
        names = _unique([f.stem for f, _ in examples])
        return Objectives(names, ("minimize",) * len(names), examples=examples)
    return _check_tasks(objective)


def _read_examples(path: Path, index: int, count: int) -> list[tuple[str, str]]:
    from loracook.objective import load_examples

    loc = (*LOC, "examples", index) if count > 1 else (*LOC, "examples")
    fix = 'write one JSON object per line: {"input": "...", "output": "..."}'
    try:
        return load_examples(path)
    except FileNotFoundError:
        raise BadInput("examples file not found", file=path, loc=loc, fix="check the path") from None
    except IsADirectoryError:
        raise BadInput("the examples path is a folder", file=path, loc=loc, fix="give a JSONL file") from None
    except UnicodeDecodeError:
        raise BadInput("the examples file is not UTF-8 text", file=path, loc=loc, fix=fix) from None
    except ValueError as exc:  # "<path>:<line>: problem" or "<path>: no examples"
        text = str(exc)
        where, _, problem = text.partition(": ")
        line = where.rsplit(":", 1)[-1] if where != str(path) else None
        error = BadInput(problem or text, file=path, fix=fix)
        error.line = int(line) if line and line.isdigit() else None
        raise error from None


def _file_digest(spec) -> object:
    """The sha256 of a local data file (or of each, for a list); anything else (a hub name) as it is."""
    if isinstance(spec, list):
        return [_file_digest(item) for item in spec]
    path = Path(str(spec))
    if not path.is_file():
        return spec
    h = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unique(names: list[str]) -> tuple[str, ...]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name]}")
    return tuple(out)


# ---------------------------------------------------------------------------------------------------- tasks


def _check_tasks(objective) -> Objectives:
    from loracook.evaluation import resolve_tasks
    from loracook.evaluation.tasks import ResolvedTask, TaskSet

    tasks = resolve_tasks(objective.tasks, Path.cwd(), loc=(*LOC, "tasks"), load=False)
    chosen: list[ResolvedTask] = []
    directions, metrics = [], []
    for index, task in enumerate(tasks.tasks):
        where = (*LOC, "tasks", index)
        if task.builtin or task.config is None:
            raise BadInput(
                f"task {task.name!r} is a built-in lm-eval task; a search needs a local task YAML whose splits "
                "it can check",
                loc=where,
                fix="copy the task YAML next to local data with a dev split (see docs/search.md)",
            )
        config = _on_split(task, objective.split, objective.allow_test_split)
        chosen.append(ResolvedTask(task.name, task.file, task.output_type, task.metrics, config))
        metric = task.metrics[0]
        metrics.append(metric)
        directions.append("maximize" if _higher_is_better(config, metric) else "minimize")
    rewritten = TaskSet(tuple(chosen))
    from loracook.evaluation.tasks import _try_build

    for task in rewritten.tasks:
        _try_build(task)  # reads the dev split once: a missing or empty split fails here, not in trial 0
    options = {"limit": objective.limit, "batch_size": objective.batch_size}
    options["apply_chat_template"] = objective.chat_template
    return Objectives(
        rewritten.names, tuple(directions), tasks=rewritten, metrics=tuple(metrics), options=options
    )


def _on_split(task, split: str, allow_test: bool) -> dict:
    """The task's config evaluated on ``split`` instead of its test split; the test split itself is refused."""
    config = copy.deepcopy(dict(task.config))
    test = config.get("test_split")
    if (split == test or split == "test") and not allow_test:
        raise BadInput(
            f"search.objective.split {split!r} is the test split of task {task.name!r}: the search would be "
            "tuned on the items that measure it",
            file=task.file,
            fix="add a dev split to the task's data_files and name it in search.objective.split, or set "
            "search.objective.allow_test_split: true",
        )
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict) and split not in files:
        raise BadInput(
            f"task {task.name!r} has no split {split!r} (its data_files: {', '.join(sorted(files))})",
            file=task.file,
            fix=f"add `{split}: dev_items.jsonl` to dataset_kwargs.data_files, or set search.objective.split",
        )
    if isinstance(files, dict) and test in files and test != split:  # never even read the test items
        config["dataset_kwargs"] = {
            **config["dataset_kwargs"],
            "data_files": {k: v for k, v in files.items() if k != test},
        }
    config.pop("test_split", None)
    config["validation_split"] = split
    return config


def _higher_is_better(config: dict, metric: str) -> bool:
    for entry in config.get("metric_list") or []:
        if isinstance(entry, dict) and entry.get("metric") == metric and "higher_is_better" in entry:
            return bool(entry["higher_is_better"])
    try:
        from lm_eval.api.registry import is_higher_better

        return bool(is_higher_better(metric))
    except Exception:  # noqa: BLE001 - an unregistered (custom) metric: assume a score
        return True


# ------------------------------------------------------------------------------------------------ scoring


def build_objective(checked: Objectives, model, tokenizer, chat_template: bool) -> Callable[[], list[float]]:
    """A function of no arguments that scores the model as it is now: one number per objective."""
    if checked.examples:
        from loracook.objective import ExamplesObjective

        scorers = [ExamplesObjective(model, tokenizer, rows, chat_template) for _, rows in checked.examples]
        return lambda: [scorer() for scorer in scorers]
    return _tasks_scorer(checked, model, tokenizer)


def _tasks_scorer(checked: Objectives, model, tokenizer) -> Callable[[], list[float]]:
    """lm-eval on the resident model; the tasks are built once (their data read once), not per candidate."""
    from lm_eval.api.task import ConfigurableTask

    from loracook.evaluation import EvalOptions, evaluate_model

    options = EvalOptions(device=str(next(model.parameters()).device), quiet=True, **checked.options)
    built = []
    for task in checked.tasks.tasks:
        config = task.lm_eval_spec()
        for key in ("tag", "group", "task_list"):
            config.pop(key, None)
        built.append(ConfigurableTask(config=config))
    tasks = _Built(built, checked.tasks.task_manager())

    def score() -> list[float]:
        with _without_environment_report():
            output = evaluate_model(
                model, tokenizer, tasks, options, task_manager=tasks.manager, label="candidate"
            )
        return [
            _metric(output, name, metric) for name, metric in zip(checked.names, checked.metrics, strict=True)
        ]

    return score


@contextlib.contextmanager
def _without_environment_report() -> Iterator[None]:
    """lm-eval ends every ``simple_evaluate`` with an environment report (``pip list`` and other subprocesses,
    about 2 s, and git) that a search would pay on every trial, and draws a progress bar per task; the scores
    depend on neither."""
    import lm_eval.api.task as task
    import lm_eval.evaluator as evaluator

    saved = evaluator.add_env_info, evaluator.get_git_commit_hash, task.tqdm
    evaluator.add_env_info, evaluator.get_git_commit_hash = (lambda results: None), (lambda: None)
    task.tqdm = lambda iterable, **kwargs: iterable  # its per-task progress bar, once per trial
    try:
        yield
    finally:
        evaluator.add_env_info, evaluator.get_git_commit_hash, task.tqdm = saved


@dataclass(frozen=True)
class _Built:
    """Prebuilt lm-eval Task objects in the shape of a TaskSet (what evaluate_model reads)."""

    tasks: list
    manager: Any

    def lm_eval_specs(self) -> list:
        return list(self.tasks)

    def task_manager(self) -> Any:
        return self.manager


def _metric(output: dict, task: str, metric: str) -> float:
    results = output["results"][task]
    keys: Sequence[str] = [k for k in results if k.split(",")[0] == metric and "stderr" not in k]
    if not keys:
        raise RuntimeError(f"lm-eval reported no {metric!r} for task {task!r}: {sorted(results)}")
    return float(results[keys[0]])
