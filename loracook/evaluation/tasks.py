"""Turn the ``evaluate.tasks`` entries of a recipe into lm-eval task configs that run offline.

An entry is a task YAML file, a folder of them (searched recursively, ``*.yaml`` and ``*.yml``), or an lm-eval
task name. Relative paths resolve against the recipe's folder. Local YAML files are read with lm-eval's own
loader (``include:`` and ``!function`` work as in lm-eval) and handed to lm-eval as config dicts, with every
relative ``data_files`` entry rewritten to an absolute path against the YAML's folder (lm-eval itself would
resolve it against the working directory).

Everything a user can get wrong is checked here, before any merge work, and raised as one-line
:class:`~loracook.errors.BadInput`: unknown task names, missing data files, splits that the data does not
have, metrics that would need a download (only lm-eval's built-in metrics work offline), malformed YAML,
and, with ``load=True`` (the default), anything lm-eval itself rejects when it builds the task and reads its
data. No model is loaded.

The built-in index of lm-eval (~14k tasks, several seconds to build) is only built when an entry is a bare
name that no local file defines; built-in tasks read their data from the hub, so they are accepted only
when that data is already in the local datasets cache.

One local YAML file is read and checked in ``task_yaml.py``; this module resolves the entries (files, folders,
names) and the built-in index.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracook.errors import BadInput
from loracook.evaluation.offline import import_lm_eval
from loracook.evaluation.task_yaml import (
    FILE_BUILDERS,
    HOW_TO_ADD,
    OUTPUT_TYPES,
    SPLIT_KEYS,
    STRUCTURAL_KEYS,
    YAML_SUFFIXES,
    ResolvedTask,
    _first_line,
    _local_task,
    _try_build,
    builtin_metrics,
)

__all__ = [
    "FILE_BUILDERS",
    "HOW_TO_ADD",
    "OUTPUT_TYPES",
    "SPLIT_KEYS",
    "STRUCTURAL_KEYS",
    "YAML_SUFFIXES",
    "ResolvedTask",
    "TaskSet",
    "builtin_metrics",
    "resolve_tasks",
]


@dataclass(frozen=True)
class TaskSet:
    """The resolved tasks of one evaluation, in the order given.

    >>> tasks = resolve_tasks(["tasks/"], Path("recipes"))  # doctest: +SKIP
    >>> tasks.names  # doctest: +SKIP
    ('loracook_arithmetic', 'loracook_capitals', 'loracook_sequences')
    """

    tasks: tuple[ResolvedTask, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(task.name for task in self.tasks)

    @property
    def needs_builtin_index(self) -> bool:
        return any(task.builtin for task in self.tasks)

    def lm_eval_specs(self) -> list[str | dict[str, Any]]:
        return [task.lm_eval_spec() for task in self.tasks]

    def task_manager(self) -> Any:
        """An lm-eval TaskManager: empty (local tasks are dicts) unless a built-in task is used."""
        if self.needs_builtin_index:
            return _builtin_manager()
        from lm_eval.tasks import TaskManager

        return TaskManager(include_defaults=False)


def resolve_tasks(
    specs: Sequence[str],
    root: str | Path,
    *,
    load: bool = True,
    loc: Sequence[str | int] = ("evaluate", "tasks"),
) -> TaskSet:
    """Resolve task names, task YAML files and folders of them (relative to ``root``) into a TaskSet.

    ``load=True`` also lets lm-eval build each task and read its data (a second or two, no model);
    ``load=False`` keeps to the static checks. Errors are :class:`BadInput` naming the file and the fix;
    ``loc`` is the recipe location of ``specs`` (the index of the entry is appended).

    >>> resolve_tasks(["./tasks/capitals.yaml"], Path("recipes")).names  # doctest: +SKIP
    ('loracook_capitals',)
    """
    import_lm_eval()
    root = Path(root)
    local: dict[str, ResolvedTask] = {}
    order: list[tuple[int, str]] = []  # (entry index, task name) in the order given
    names: list[tuple[int, str]] = []  # bare names, resolved once every local file is known
    for index, spec in enumerate(specs):
        where = (*loc, index)
        if not isinstance(spec, str) or not spec.strip():
            raise BadInput(
                f"task entry {spec!r} is empty", loc=where, fix="give a task name, YAML file or folder"
            )
        path = (root / Path(spec).expanduser()).resolve()
        if path.is_dir():
            found = _task_files(path)
            if not found:
                raise BadInput(f"the task folder {path} holds no task YAML file", loc=where, fix=HOW_TO_ADD)
            for file in found:
                task = _local_task(file, in_folder=True)
                if task is not None:
                    _add(local, order, task, index, where)
        elif path.is_file():
            _add(local, order, _local_task(path), index, where)
        elif _looks_like_path(spec):
            raise BadInput(
                f"task file {spec!r} not found (looked for {path})",
                loc=where,
                fix="check the path (relative to the recipe's folder)",
            )
        else:
            names.append((index, spec.strip()))
            order.append((index, spec.strip()))
    builtin: dict[str, ResolvedTask] = {}
    for index, name in names:
        if name not in local and name not in builtin:
            builtin[name] = _builtin_task(name, sorted(local), (*loc, index))
    tasks: list[ResolvedTask] = []
    seen: set[str] = set()
    for _, name in order:
        if name not in seen:
            seen.add(name)
            tasks.append(local.get(name) or builtin[name])
    task_set = TaskSet(tuple(tasks))
    if load:
        for task in task_set.tasks:
            if not task.builtin:
                _try_build(task)
    return task_set


# -------------------------------------------------------------------------------------------------- local


def _task_files(folder: Path) -> list[Path]:
    files = [p for suffix in YAML_SUFFIXES for p in folder.rglob(f"*{suffix}")]
    return sorted(
        p for p in files if not any(part.startswith((".", "__")) for part in p.relative_to(folder).parts)
    )


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "/" in spec or "\\" in spec or spec.endswith(YAML_SUFFIXES)


def _add(
    local: dict[str, ResolvedTask],
    order: list[tuple[int, str]],
    task: ResolvedTask,
    index: int,
    where: Sequence[str | int],
) -> None:
    previous = local.get(task.name)
    if previous is not None and previous.file != task.file:
        raise BadInput(
            f"two task files define the task {task.name!r} ({previous.file} and {task.file})",
            file=task.file,
            loc=where,
            fix="give each task a unique `task:` name",
        )
    local[task.name] = task
    order.append((index, task.name))


# ----------------------------------------------------------------------------------------------- built-in


@functools.cache
def _builtin_manager() -> Any:
    from lm_eval.tasks import TaskManager

    return TaskManager()  # indexes the ~14k built-in tasks: seconds, so built once and only when needed


def _builtin_task(name: str, local_names: list[str], where: Sequence[str | int]) -> ResolvedTask:
    manager = _builtin_manager()
    entry = manager.task_index.get(name)
    if entry is None:
        hint = difflib.get_close_matches(name, [*local_names, *manager.all_tasks], n=1)
        raise BadInput(
            f"unknown task {name!r}: not a task YAML file or folder, and not an lm-eval task",
            loc=where,
            fix=f"did you mean {hint[0]!r}?"
            if hint
            else "give the path of a task YAML file (" + HOW_TO_ADD + ")",
        )
    dataset = (entry.cfg or {}).get("dataset_path") if entry.cfg else None
    try:
        loaded = manager.load([name])
    except Exception as exc:
        what = f"the hub dataset {dataset!r}" if dataset else "hub data"
        raise BadInput(
            f"lm-eval task {name!r} needs {what}, which is not available offline ({_first_line(exc)})",
            loc=where,
            fix="copy the task YAML next to a local copy of its data (data_files); " + HOW_TO_ADD,
        ) from None
    tasks = loaded["tasks"]
    first = next(iter(tasks.values()), None)
    output_type = first.get_config("output_type") if first is not None and len(tasks) == 1 else "group"
    metrics = tuple(first._metric_fn_list) if first is not None and len(tasks) == 1 else ()
    return ResolvedTask(name=name, file=None, output_type=output_type, metrics=metrics)
