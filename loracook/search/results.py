"""What a finished search leaves: the chosen trial, best.yaml, trials.jsonl, summary.json and the card section.

The chosen trial: with one objective, the best value (lowest trial number on ties); with several, the
``select`` rule over the objectives turned "higher is better": ``worst`` maximises the worst of them (on a
tie, the better mean), ``mean`` their mean, and ``improve`` the smaller of the two gains over the starting points
(the enqueued trials): min(mean - M0, worst - W0), M0 and W0 the best mean and the best worst objective among
them (an achievement scalarizing function with the starting points as the reference; Wierzbicki, 1980). A trial
with a positive score beats every starting point on both the mean and the worst objective. The rule and the
chosen trial are recorded in summary.json and the model card.

With several objectives and a single-objective sampler (tpe, cmaes, random), the study itself optimises that
select score (see :func:`loracook.search.study.scalarized`; for ``worst`` and ``improve``, with a small share of
the mean added: :func:`study_value`): its one value is the ``score`` of a trial, and the
trial's own objectives (after the L1 term) are kept in its attributes; :func:`records` gives them back as the
record's ``values``, so everything downstream reads the objectives whichever kind of study it is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loracook.errors import BadInput


@dataclass(frozen=True)
class Record:
    """One trial as trials.jsonl stores it."""

    number: int
    state: str
    params: dict[str, float]
    values: list[float] | None
    attrs: dict[str, Any] = field(default_factory=dict)
    start: str | None = None
    complete: str | None = None

    @property
    def info(self) -> dict[str, Any]:
        """The trial's user attributes, with what the worker recorded after scoring it flattened in."""
        attrs = dict(self.attrs)
        return {**attrs.pop("info", {}), **attrs}

    def to_json(self) -> dict:
        attrs = self.info
        out = {
            "number": self.number,
            "state": self.state,
            "params": self.params,
            "values": self.values,
            "objectives": attrs.pop("objectives", None),
            "l1_penalty": attrs.pop("l1_penalty", None),
            "seconds": attrs.pop("seconds", None),
        }
        out.update(attrs)
        out.update({"datetime_start": self.start, "datetime_complete": self.complete})
        return out


def records(study) -> list[Record]:
    from optuna.trial import TrialState

    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.state == TrialState.WAITING:
            continue
        values = list(t.values) if t.values is not None else None
        attrs = dict(t.user_attrs)
        info = attrs.get("info") or {}
        if "values" in info:  # a scalarized study: its value is the select score of these objectives
            attrs["info"] = {k: v for k, v in info.items() if k != "values"}
            attrs["score"] = values[0] if values else None
            values = list(info["values"]) if values is not None else None
        out.append(
            Record(
                t.number,
                t.state.name,
                dict(t.params),
                values,
                attrs,
                t.datetime_start.isoformat() if t.datetime_start else None,
                t.datetime_complete.isoformat() if t.datetime_complete else None,
            )
        )
    return out


def select(done: list[Record], signs: tuple[float, ...], rule: str) -> Record:
    """The written trial (see the module docstring)."""
    if not done:
        raise BadInput(
            "the search has no finished trial to write", loc=("search",), fix="run it with a larger budget"
        )
    reference = reference_for(done, signs, rule)
    return max(done, key=lambda r: (selection_score(r, signs, rule, reference), _mean(r, signs), -r.number))


Reference = tuple[float, float]  # select: improve's (best mean, best worst) of the starting points


def reference_for(done: list[Record], signs: tuple[float, ...], rule: str) -> Reference | None:
    """``improve``'s reference from the finished starting points among ``done`` (None for the other rules)."""
    if rule != "improve":
        return None
    return start_reference([r.values for r in done if r.info.get("start") and r.values], signs)


def start_reference(starts: list[list[float]], signs: tuple[float, ...]) -> Reference | None:
    """(the best mean, the best worst objective) of the starting points' values, turned higher-is-better;
    None when none of them has finite values (``improve`` then scores like ``worst``)."""
    scored = [_signed(values, signs) for values in starts if all(math.isfinite(v) for v in values)]
    if not scored:
        return None
    return max(sum(v) / len(v) for v in scored), max(min(v) for v in scored)


def _mean(record: Record, signs: tuple[float, ...]) -> float:
    """Breaks ties of ``worst``: of two trials with the same worst objective, the one better on the others (on
    few items a task metric moves in steps, and equal worst scores are common; a trial another dominates is
    never written)."""
    return _signed_mean(record.values or [], signs)


def _signed(values: list[float], signs: tuple[float, ...]) -> list[float]:
    """The objectives turned higher-is-better."""
    return [s * v for s, v in zip(signs, values, strict=True)]


def _signed_mean(values: list[float], signs: tuple[float, ...]) -> float:
    """The mean of the objectives turned higher-is-better (0.0 for none)."""
    signed = _signed(values, signs)
    return sum(signed) / len(signed) if signed else 0.0


def selection_score(
    record: Record, signs: tuple[float, ...], rule: str, reference: Reference | None = None
) -> float:
    """What ``select`` maximises: the objective turned higher-is-better (one), or their worst / mean / gain
    over the starting points (several; ``reference`` from :func:`reference_for`)."""
    return select_score(record.values or [], signs, rule, reference)


RULE_LABELS = {
    "worst": "worst objective",
    "mean": "mean objective",
    "improve": "gain over the starts",
}
AUGMENT = 0.01  # the scalarized study's worst + AUGMENT · mean (augmented Chebyshev: Steuer and Choo, 1983)


def study_value(
    values: list[float], signs: tuple[float, ...], rule: str, reference: Reference | None = None
) -> float:
    """A scalarized study's one value: the select score; for ``worst`` and ``improve`` plus AUGMENT times the
    mean, so that the sampler, like :func:`select`, prefers the better of two points with the same score."""
    score = select_score(values, signs, rule, reference)
    if rule == "mean" or len(values) < 2:
        return score
    return score + AUGMENT * _signed_mean(values, signs)


def select_score(
    values: list[float], signs: tuple[float, ...], rule: str, reference: Reference | None = None
) -> float:
    """The select rule on one trial's objectives; NaN when any of them is not finite."""
    signed = _signed(values, signs)
    if not all(math.isfinite(v) for v in signed):
        return math.nan
    if len(signed) == 1:
        return signed[0]
    mean, worst = sum(signed) / len(signed), min(signed)
    if rule == "mean":
        return mean
    if rule == "improve" and reference is not None:
        return min(mean - reference[0], worst - reference[1])
    return worst


def natural(score: float, signs: tuple[float, ...], rule: str = "worst") -> float:
    """A selection score in the objectives' own units when they share a direction (e.g. the worst loss); a
    gain (``improve``) stays a gain."""
    return -score if rule != "improve" and all(s < 0 for s in signs) else score


def best_so_far(done: list[Record], signs: tuple[float, ...], rule: str) -> list[tuple[int, float]]:
    """(trial number, the selection score of the best trial up to it, in natural units), for the plot."""
    reference = reference_for(done, signs, rule)
    out, best = [], None
    for record in sorted(done, key=lambda r: r.number):
        value = selection_score(record, signs, rule, reference)
        best = value if best is None else max(best, value)
        out.append((record.number, natural(best, signs, rule)))
    return out


# --------------------------------------------------------------------------------------------- best.yaml


def best_recipe(recipe, weights: dict, densities: dict, target: Path):
    """The recipe with the chosen weights (and densities) filled in, no search section, its output at
    ``target``; every path is already absolute (the recipe layer resolves them against the recipe's folder)."""
    update: dict[str, Any] = {"weights": dict(weights)}
    if densities:
        update["density"] = dict(densities)
    merge = recipe.merge.model_copy(update=update)
    output = recipe.output.model_copy(update={"path": str(Path(target).resolve())})
    return recipe.model_copy(update={"merge": merge, "output": output, "search": None})


def recipe_yaml(recipe, header: str) -> str:
    """A plain recipe file: the keys the user set (defaults left out), method first in `merge`."""
    data = recipe.model_dump(mode="json", exclude_unset=True)
    data.pop("search", None)
    merge = data.get("merge", {})
    data["merge"] = {"method": recipe.merge.method, **{k: v for k, v in merge.items() if k != "method"}}
    data["output"]["path"] = recipe.output.path
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return comment + yaml.safe_dump(data, sort_keys=False, width=110)


# -------------------------------------------------------------------------------------------- the folder


def write_files(
    folder: Path, rows: list[Record], summary: dict, best_text: str, journal: Path | None
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "best.yaml").write_text(best_text, encoding="utf-8")
    lines = "".join(json.dumps(r.to_json(), sort_keys=False) + "\n" for r in rows)
    (folder / "trials.jsonl").write_text(lines, encoding="utf-8")
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if journal is not None and journal.is_file():
        (folder / journal.name).write_bytes(journal.read_bytes())


def card_section(summary: dict) -> str:
    """The model card's search section (markdown)."""
    chosen = summary["chosen"]
    objectives = ", ".join(f"{name} {value:.4g}" for name, value in (chosen.get("objectives") or {}).items())
    weights = ", ".join(f"`{k}` {_short(v)}" for k, v in summary["weights"].items())
    lines = [
        "## Search",
        "",
        f"The merge weights were searched with Optuna ({summary['sampler']}, seed {summary['seed']}): "
        f"{summary['finished']} trials scored by {summary['scorer']}, {summary['objective']}.",
        "",
        f"- chosen: trial {chosen['number']} ({summary['rule']}); objectives: {objectives}",
        f"- weights: {weights}",
    ]
    if summary.get("densities"):
        lines.append("- densities: " + ", ".join(f"`{k}` {v:.3g}" for k, v in summary["densities"].items()))
    start = summary.get("start")
    if start:
        shown = ", ".join(f"{k} {v:.4g}" for k, v in (start.get("objectives") or {}).items())
        lines.append(f"- starting point ({start['label']}): trial {start['number']}, objectives: {shown}")
    lines += [
        f"- time: {summary['seconds']:.1f} s in all, {summary['seconds_per_trial']:.2f} s per trial",
        "- files: search/best.yaml (a plain recipe that reproduces this output), search/trials.jsonl, "
        "search/summary.json, search/search.png",
        "",
    ]
    return "\n".join(lines)


def _short(value) -> str:
    if isinstance(value, list):
        groups = list(dict.fromkeys(round(v, 4) for v in value))
        return "per layer [" + ", ".join(f"{v:.3g}" for v in groups) + "]"
    return f"{value:.4g}"


def with_card_section(card: str, section: str) -> str:
    """Insert the search section before the card's recipe section (or at the end)."""
    marker = "## Recipe"
    if marker in card:
        head, _, tail = card.partition(marker)
        return head + section + "\n" + marker + tail
    return card.rstrip() + "\n\n" + section
