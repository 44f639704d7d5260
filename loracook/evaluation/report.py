"""The evaluation report: scores of every candidate on every task/metric, as JSON, table rows, markdown, PNG.

``eval_results.json`` (schema_version 1; the fields are documented in docs/evaluation.md)::

    {"schema": "loracook/eval_results", "schema_version": 1, "created": "2025-01-01T12:00:00Z",
     "lm_eval_version": "0.4.13", "wall_seconds": 41.2,
     "options": {"limit": null, "num_fewshot": null, "batch_size": 8, "device": "cpu", ...},
     "candidates": [{"name": "base", "kind": "base", "source": "...", "seconds": 12.1, "eval_seconds": 12.0}],
     "tasks": [{"name": "loracook_capitals", "file": ".../capitals.yaml", "output_type": "multiple_choice",
                "num_fewshot": 0, "samples": 48, "total": 48}],
     "results": [{"task": "loracook_capitals", "metric": "acc", "filter": "none", "higher_is_better": true,
                  "scores": {"base": {"value": 0.75, "stderr": 0.063}}}]}

Nothing here imports torch or lm-eval; matplotlib is imported by :meth:`EvalReport.plot` only.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loracook.errors import BadInput

SCHEMA = "loracook/eval_results"
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Score:
    value: float | None
    stderr: float | None = None

    def format(self, digits: int = 3) -> str:
        """``0.750 ± 0.063``; ``0.750`` without a stderr; ``n/a`` without a value."""
        if self.value is None:
            return "n/a"
        if self.stderr is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ± {self.stderr:.{digits}f}"


@dataclass(frozen=True)
class MetricRow:
    """One task/metric (after one lm-eval filter) and the score of each candidate, by candidate name."""

    task: str
    metric: str
    filter: str
    higher_is_better: bool | None
    scores: Mapping[str, Score]

    @property
    def metric_label(self) -> str:
        return self.metric if self.filter == "none" else f"{self.metric} ({self.filter})"


@dataclass(frozen=True)
class CandidateInfo:
    name: str
    kind: str
    source: str
    seconds: float  # wall time: opening the candidate (loading, wrapping) plus lm-eval
    eval_seconds: float  # wall time of lm-eval alone


@dataclass(frozen=True)
class TaskInfo:
    name: str
    file: str | None  # the task YAML; None for a built-in lm-eval task
    output_type: str
    num_fewshot: int | None
    samples: int | None  # examples scored (after `limit`)
    total: int | None  # examples in the evaluation split


@dataclass(frozen=True)
class EvalReport:
    """Side-by-side scores. Build it with :func:`evaluate_candidates`, or :meth:`load` a saved one.

    >>> report = EvalReport.load("out/merged/eval_results.json")  # doctest: +SKIP
    >>> report.score("loracook_capitals", "acc", "merged").value  # doctest: +SKIP
    0.792
    """

    candidates: tuple[CandidateInfo, ...]
    tasks: tuple[TaskInfo, ...]
    rows: tuple[MetricRow, ...]
    options: Mapping[str, Any]
    lm_eval_version: str
    created: str
    wall_seconds: float

    @property
    def candidate_names(self) -> list[str]:
        return [c.name for c in self.candidates]

    def score(self, task: str, metric: str, candidate: str, *, filter: str | None = None) -> Score:
        for row in self.rows:
            if row.task == task and row.metric == metric and (filter is None or row.filter == filter):
                return row.scores.get(candidate, Score(None))
        raise KeyError(f"no result for {task}/{metric}")

    # ----------------------------------------------------------------------------------------- JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": self.created,
            "lm_eval_version": self.lm_eval_version,
            "wall_seconds": round(self.wall_seconds, 3),
            "options": dict(self.options),
            "candidates": [
                {
                    "name": c.name,
                    "kind": c.kind,
                    "source": c.source,
                    "seconds": round(c.seconds, 3),
                    "eval_seconds": round(c.eval_seconds, 3),
                }
                for c in self.candidates
            ],
            "tasks": [vars(t).copy() for t in self.tasks],
            "results": [
                {
                    "task": r.task,
                    "metric": r.metric,
                    "filter": r.filter,
                    "higher_is_better": r.higher_is_better,
                    "scores": {name: {"value": s.value, "stderr": s.stderr} for name, s in r.scores.items()},
                }
                for r in self.rows
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalReport:
        if data.get("schema") != SCHEMA or data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"not a {SCHEMA} v{SCHEMA_VERSION} document")
        return cls(
            candidates=tuple(CandidateInfo(**c) for c in data["candidates"]),
            tasks=tuple(TaskInfo(**t) for t in data["tasks"]),
            rows=tuple(
                MetricRow(
                    task=r["task"],
                    metric=r["metric"],
                    filter=r["filter"],
                    higher_is_better=r["higher_is_better"],
                    scores={n: Score(s["value"], s["stderr"]) for n, s in r["scores"].items()},
                )
                for r in data["results"]
            ),
            options=data["options"],
            lm_eval_version=data["lm_eval_version"],
            created=data["created"],
            wall_seconds=data["wall_seconds"],
        )

    def save(self, path: str | Path) -> Path:
        """Write eval_results.json (atomically: a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp")
        staging.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(staging, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalReport:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BadInput(f"cannot read evaluation results: {exc}", file=path) from None

    # ---------------------------------------------------------------------------------------- tables

    def table(self, digits: int = 3) -> tuple[list[str], list[list[str]]]:
        """Header and rows for a side-by-side table: task, metric, n, then one "value ± stderr" per candidate.

        >>> header, rows = report.table()  # doctest: +SKIP
        >>> header                         # doctest: +SKIP
        ['task', 'metric', 'n', 'base', 'med', 'merged']
        """
        samples = {t.name: t.samples for t in self.tasks}
        header = ["task", "metric", "n", *self.candidate_names]
        rows = [
            [
                row.task,
                row.metric_label,
                "" if samples.get(row.task) is None else str(samples[row.task]),
                *(row.scores.get(name, Score(None)).format(digits) for name in self.candidate_names),
            ]
            for row in self.rows
        ]
        return header, rows

    def best(self, row: MetricRow) -> set[str]:
        """The candidates with the best value of a row (empty when there is nothing to compare)."""
        values = {n: s.value for n, s in row.scores.items() if s.value is not None and math.isfinite(s.value)}
        if len(values) < 2 or row.higher_is_better is None or len(set(values.values())) == 1:
            return set()
        top = max(values.values()) if row.higher_is_better else min(values.values())
        return {n for n, v in values.items() if v == top}

    def markdown(self, digits: int = 3) -> str:
        """The table as GitHub markdown (for the model card); the best value of each row is bold."""
        header, rows = self.table(digits)
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---", "---", "---:"] + ["---:"] * (len(header) - 3)) + "|",
        ]
        for row, cells in zip(self.rows, rows, strict=True):
            best = self.best(row)
            cells = cells[:3] + [
                f"**{cell}**" if name in best else cell
                for name, cell in zip(self.candidate_names, cells[3:], strict=True)
            ]
            lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        shots = sorted({t.num_fewshot for t in self.tasks if t.num_fewshot is not None})
        note = f"lm-eval {self.lm_eval_version}; value ± stderr"
        if shots:
            note += f"; {'/'.join(map(str, shots))}-shot"
        if self.options.get("limit") is not None:
            note += f"; limit {self.options['limit']}"
        return "\n".join(lines) + f"\n\n_{note}._\n"

    # ------------------------------------------------------------------------------------------ plot

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """A PNG with one bar chart per task/metric: a bar per candidate, stderr as error bars."""
        from loracook.plots import new_figure

        if not self.rows:
            raise ValueError("the report has no results to plot")
        names = self.candidate_names
        columns = min(len(self.rows), 3)
        lines = math.ceil(len(self.rows) / columns)
        width = max(3.2, 0.75 * len(names) + 1.2)
        figure = new_figure(figsize=(width * columns, 3.4 * lines + 0.6), dpi=120, layout="constrained")
        colors = [f"C{i % 10}" for i in range(len(names))]
        axes = figure.subplots(lines, columns, squeeze=False).ravel()
        for ax, row in zip(axes, self.rows, strict=False):
            scores = [row.scores.get(n, Score(None)) for n in names]
            values = [s.value if s.value is not None else 0.0 for s in scores]
            errors = [s.stderr or 0.0 for s in scores]
            tops = [v + e for v, e in zip(values, errors, strict=True)]
            bars = ax.bar(
                range(len(names)), values, yerr=errors, capsize=4, color=colors, edgecolor="black", lw=0.5
            )
            for bar, score, top in zip(bars, scores, tops, strict=True):
                ax.annotate(
                    "n/a" if score.value is None else f"{score.value:.3f}",
                    (bar.get_x() + bar.get_width() / 2, top),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
            ax.set_xticks(
                range(len(names)),
                names,
                rotation=30 if len(names) > 3 else 0,
                ha="right" if len(names) > 3 else "center",
            )
            ax.set_title(
                f"{row.task}\n{row.metric_label}"
                + ("" if row.higher_is_better is not False else " (lower is better)"),
                fontsize=9,
            )
            # shares and accuracies on a 0-1 scale; anything else (perplexity) on its own; room for labels
            ceiling = max(1.0, *tops) if all(0.0 <= v <= 1.0 for v in values) else max(*tops, 1e-9)
            ax.set_ylim(0, ceiling * 1.12)
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
            ax.tick_params(labelsize=8)
        for ax in axes[len(self.rows) :]:
            ax.set_visible(False)
        figure.suptitle(title or "Evaluation (value ± stderr)", fontsize=11)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        return path


# ------------------------------------------------------------------------------------------- building


def build_report(
    runs: Sequence[Any], tasks: Any, options: Mapping[str, Any], lm_eval_version: str, wall_seconds: float
) -> EvalReport:
    """Turn the raw lm-eval outputs of :class:`~loracook.evaluation.runner.CandidateRun` s into a report."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for run in runs:
        output = run.output
        for task in _task_order(tasks.names, output["results"]):
            better = output.get("higher_is_better", {}).get(task, {})
            for metric, flt, value, stderr in _metrics(output["results"][task]):
                row = rows.setdefault(
                    (task, metric, flt),
                    {"higher_is_better": better.get(metric), "scores": {}},
                )
                row["scores"][run.candidate.name] = Score(value, stderr)
    first = runs[0].output if runs else {}
    task_infos = []
    for name in _task_order(tasks.names, first.get("results", {})):
        resolved = next((t for t in tasks.tasks if t.name == name), None)
        counts = first.get("n-samples", {}).get(name, {})
        config = first.get("configs", {}).get(name, {})
        task_infos.append(
            TaskInfo(
                name=name,
                file=str(resolved.file) if resolved is not None and resolved.file is not None else None,
                output_type=config.get("output_type", resolved.output_type if resolved else "group"),
                num_fewshot=first.get("n-shot", {}).get(name),
                samples=counts.get("effective"),
                total=counts.get("original"),
            )
        )
    return EvalReport(
        candidates=tuple(
            CandidateInfo(r.candidate.name, r.candidate.kind, r.candidate.source, r.seconds, r.eval_seconds)
            for r in runs
        ),
        tasks=tuple(task_infos),
        rows=tuple(
            MetricRow(task, metric, flt, row["higher_is_better"], row["scores"])
            for (task, metric, flt), row in rows.items()
        ),
        options=dict(options),
        lm_eval_version=lm_eval_version,
        created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        wall_seconds=wall_seconds,
    )


def _task_order(requested: Iterable[str], results: Mapping[str, Any]) -> list[str]:
    """The requested tasks first, in order, then whatever else lm-eval reported (subtasks of groups)."""
    order = [name for name in requested if name in results]
    return order + [name for name in results if name not in order]


def _metrics(entry: Mapping[str, Any]) -> Iterable[tuple[str, str, float | None, float | None]]:
    """lm-eval writes ``{"acc,none": 0.7, "acc_stderr,none": 0.06, "alias": ...}``; yield (metric, filter,
    value, stderr) for every metric, in lm-eval's order."""
    for key, value in entry.items():
        if "," not in key:
            continue  # alias, sample counts
        metric, flt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        yield metric, flt, _number(value), _number(entry.get(f"{metric}_stderr,{flt}"))


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # lm-eval writes "N/A" when it has no stderr
    return float(value) if math.isfinite(value) else None
