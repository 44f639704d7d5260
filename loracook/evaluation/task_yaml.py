"""One local task YAML, read with lm-eval's own loader and checked offline: its keys, output type, metrics (only
those lm-eval computes itself), data files made absolute against the YAML's folder, splits; :func:`_try_build`
lets lm-eval build it once (reads the data, no model). The result is a :class:`ResolvedTask`."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracook.errors import BadInput

# Builders of the `datasets` library that read local files through `data_files`.
FILE_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow"})
YAML_SUFFIXES = (".yaml", ".yml")
OUTPUT_TYPES = ("multiple_choice", "generate_until", "loglikelihood", "loglikelihood_rolling")
# Keys lm-eval accepts in a task YAML besides the TaskConfig fields (it strips them before building).
STRUCTURAL_KEYS = frozenset({"tag", "group", "task_list", "class", "include"})
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
HOW_TO_ADD = "see docs/evaluation.md, 'Adding a task'"


@dataclass(frozen=True)
class ResolvedTask:
    """One lm-eval task, ready to run: a local config dict (``file`` set) or a built-in name (``file=None``)."""

    name: str
    file: Path | None
    output_type: str
    metrics: tuple[str, ...]
    config: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)

    @property
    def builtin(self) -> bool:
        return self.file is None

    def lm_eval_spec(self) -> str | dict[str, Any]:
        """What ``simple_evaluate(tasks=[...])`` takes: a fresh copy of the config (lm-eval mutates it)."""
        return self.name if self.config is None else copy.deepcopy(dict(self.config))


def _local_task(file: Path, *, in_folder: bool = False) -> ResolvedTask | None:
    """Read and check one task YAML. In a folder, include-only templates and group files are skipped (None):
    the tasks themselves are in the folder too."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        raw = load_yaml(file, resolve_func=False)
    except FileNotFoundError as exc:  # a missing `include:` target
        raise BadInput(
            f"malformed task YAML: included file {exc.filename} not found",
            file=file,
            fix="fix the include path",
        ) from None
    except Exception as exc:  # yaml.YAMLError, a non-mapping document, an include cycle
        raise BadInput(f"malformed task YAML: {_yaml_problem(exc)}", file=file, fix=HOW_TO_ADD) from None
    if "group" in raw:
        if in_folder:
            return None
        raise BadInput(
            "task groups are not supported in local task files", file=file, fix="list the task files instead"
        )
    if not isinstance(raw.get("task"), str) or not raw["task"].strip():
        if in_folder:
            return None
        raise BadInput("malformed task YAML: it has no `task:` name", file=file, fix=HOW_TO_ADD)
    _check_keys(raw, file)
    name = raw["task"]
    output_type = raw.get("output_type", "generate_until")
    if output_type not in OUTPUT_TYPES:
        raise BadInput(
            f"task {name!r} has unknown output_type {output_type!r}",
            file=file,
            fix=f"use one of {', '.join(OUTPUT_TYPES)}",
        )
    try:
        config = load_yaml(file, resolve_func=True)  # imports `!function` helpers next to the YAML
    except Exception as exc:
        raise BadInput(
            f"task {name!r}: {_first_line(exc)}", file=file, fix="fix the `!function` reference"
        ) from None
    metrics = _check_metrics(config, name, output_type, file)
    if "class" not in config and config.get("custom_dataset") is None:
        _absolute_data(config, name, file)
    return ResolvedTask(name=name, file=file, output_type=output_type, metrics=metrics, config=config)


def _check_keys(raw: Mapping[str, Any], file: Path) -> None:
    from lm_eval.config.task import TaskConfig

    known = {f.name for f in dataclasses.fields(TaskConfig)} | STRUCTURAL_KEYS
    for key in raw:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            raise BadInput(
                f"malformed task YAML: unknown key {key!r}",
                file=file,
                fix=f"did you mean {hint[0]!r}?" if hint else HOW_TO_ADD,
            )


def builtin_metrics() -> tuple[str, ...]:
    """Metrics lm-eval computes itself (everything else is fetched by the evaluate library from the hub)."""
    import lm_eval.api.metrics  # noqa: F401  (fills the registry)
    from lm_eval.api.registry import metric_registry

    return tuple(sorted(name for name in metric_registry.keys() if name != "bypass"))  # bypass: a placeholder


def _check_metrics(config: Mapping[str, Any], name: str, output_type: str, file: Path) -> tuple[str, ...]:
    """Only metrics lm-eval computes itself, a local `!function`, or the keys of a process_results function."""
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY, aggregation_registry

    metric_list = config.get("metric_list")
    if metric_list is None:
        return tuple(DEFAULT_METRIC_REGISTRY[output_type])
    if not isinstance(metric_list, list) or not metric_list:
        raise BadInput(f"task {name!r}: metric_list must be a list of {{metric: ...}} entries", file=file)
    builtin = builtin_metrics()
    custom_results = config.get("process_results") is not None  # metric names are then just result keys
    names: list[str] = []
    for entry in metric_list:
        if not isinstance(entry, Mapping) or "metric" not in entry:
            raise BadInput(f"task {name!r}: every metric_list entry needs a `metric:` key", file=file)
        metric = entry["metric"]
        if callable(metric):  # `metric: !function utils.my_metric`, computed locally
            names.append(metric.__name__)
            continue
        if not isinstance(metric, str):
            raise BadInput(f"task {name!r}: metric {metric!r} is not a name", file=file)
        if entry.get("hf_evaluate") is True:
            raise BadInput(
                f"task {name!r}: metric {metric!r} uses the evaluate library (hf_evaluate: true), "
                "which downloads it from the hub and does not work offline",
                file=file,
                fix=f"drop hf_evaluate and use a built-in metric: {', '.join(builtin)}",
            )
        if metric not in builtin and metric != "bypass" and not custom_results:
            raise BadInput(
                f"task {name!r}: metric {metric!r} is not available offline (not a built-in lm-eval metric; "
                "lm-eval would fetch it from the hub with the evaluate library)",
                file=file,
                fix=f"use one of {', '.join(builtin)}, or compute it in a process_results function",
            )
        aggregation = entry.get("aggregation")
        if isinstance(aggregation, str) and aggregation not in aggregation_registry:
            raise BadInput(
                f"task {name!r}: unknown aggregation {aggregation!r} for metric {metric!r}",
                file=file,
                fix=f"use one of {', '.join(sorted(aggregation_registry.keys()))}",
            )
        names.append(metric)
    return tuple(names)


def _absolute_data(config: dict[str, Any], name: str, file: Path) -> None:
    """Rewrite relative data paths against the YAML's folder, check they exist, and check the splits."""
    dataset_path = config.get("dataset_path")
    if not isinstance(dataset_path, str) or not dataset_path:
        raise BadInput(
            f"task {name!r} has no dataset_path", file=file, fix="use `dataset_path: json` with data_files"
        )
    kwargs = config.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadInput(f"task {name!r}: dataset_kwargs must be a mapping", file=file)
    local_dir = (file.parent / dataset_path).resolve()
    if dataset_path.lower() in FILE_BUILDERS:
        data_files = kwargs.get("data_files")
        if data_files is None:
            raise BadInput(
                f"task {name!r} reads {dataset_path} files but gives no data_files",
                file=file,
                fix="add dataset_kwargs: {data_files: {test: your_data.jsonl}}",
            )
        kwargs["data_files"] = _absolute_files(data_files, name, file)
        config["dataset_kwargs"] = kwargs
        splits = set(kwargs["data_files"]) if isinstance(kwargs["data_files"], dict) else {"train"}
        for key in SPLIT_KEYS:
            split = config.get(key)
            if split is not None and split not in splits:
                raise BadInput(
                    f"task {name!r}: {key} {split!r} is not among the data_files splits ({', '.join(sorted(splits))})",
                    file=file,
                    fix=f"name the split {split!r} in data_files, or change {key}",
                )
    elif dataset_path.startswith((".", "/", "~")) or local_dir.is_dir():
        if not local_dir.exists():
            raise BadInput(
                f"task {name!r}: data folder {dataset_path!r} not found", file=file, fix="check the path"
            )
        config["dataset_path"] = str(local_dir)  # its own data_files are relative to it, as in `datasets`
    # else: a hub dataset id; whether it is in the local cache shows when the task is built (load=True)


def _absolute_files(data_files: Any, name: str, file: Path) -> Any:
    if isinstance(data_files, dict):
        return {split: _absolute_files(value, name, file) for split, value in data_files.items()}
    if isinstance(data_files, list):
        return [_absolute_files(value, name, file) for value in data_files]
    if not isinstance(data_files, str):
        raise BadInput(f"task {name!r}: data_files entry {data_files!r} is not a path", file=file)
    path = Path(data_files).expanduser()
    path = path if path.is_absolute() else (file.parent / path).resolve()
    if not (glob.glob(str(path)) if glob.has_magic(str(path)) else path.is_file()):
        raise BadInput(
            f"task {name!r}: data file {data_files!r} not found (looked for {path})",
            file=file,
            fix="data_files are relative to the task YAML's folder",
        )
    return str(path)


def _try_build(task: ResolvedTask) -> None:
    """Let lm-eval build the task once: reads the data and renders the first prompt. Cheap; no model."""
    from lm_eval.api.task import ConfigurableTask

    config = task.lm_eval_spec()
    assert isinstance(config, dict)
    for key in ("tag", "group", "task_list"):
        config.pop(key, None)
    if "class" in config:
        return  # a Python task: lm-eval decides how to build it
    try:
        ConfigurableTask(config=config)
    except BadInput:
        raise
    except IndexError:
        raise BadInput(f"task {task.name!r}: its evaluation split is empty", file=task.file) from None
    except ConnectionError:  # datasets' OfflineModeIsEnabled: a hub dataset that is not in the local cache
        raise BadInput(
            f"task {task.name!r} needs the hub dataset {config.get('dataset_path')!r}, "
            "which is not available offline (not in the local datasets cache)",
            file=task.file,
            fix="point dataset_path: json and data_files at a local copy of the data",
        ) from None
    except Exception as exc:  # e.g. a Jinja syntax error, a field the data lacks, unreadable data
        raise BadInput(
            f"task {task.name!r} cannot be loaded: {type(exc).__name__}: {_first_line(exc)}",
            file=task.file,
            fix=HOW_TO_ADD,
        ) from None


def _yaml_problem(exc: BaseException) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if mark is not None and problem:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
