"""The quality study: run every skill recipe, evaluate every result on every skill, write docs/quality.md.

    python scripts/skills/study.py                 # everything (about 6 minutes on 2 CPU cores)
    python scripts/skills/study.py --demo          # the demo (`make demo`): one recipe per method, 3 skills
    python scripts/skills/study.py --reuse         # keep merged outputs already in out/skills/
    python scripts/skills/study.py --doc-only      # rewrite docs/quality.md and the chart from the saved scores

Steps, all offline:

1. checks that recipes/skills/data/ matches scripts/skills/make_data.py and that the skill adapters exist;
2. builds the full fine-tune used by the extraction recipe if it is not cached (scripts/skills/finetune.py);
3. runs each recipe in recipes/skills/ through the CLI (``loracook run RECIPE --output out/skills/NAME
   --force``), so the merged adapters are left on disk;
4. loads SmolLM2-135M-Instruct once and scores the base, each skill adapter, each merge, the fine-tune and
   its extraction on the skill tasks of recipes/skills/tasks/ with lm-eval (loracook.evaluation: adapters are
   attached to the in-memory base one at a time and removed afterwards);
5. writes docs/quality.md (tables, retention ratios, findings, conclusion), docs/quality.png (the chart) and
   recipes/skills/study_results.json (every score, in the eval_results.json format), and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKILLS = ROOT / "recipes" / "skills"
OUT = ROOT / "out" / "skills"
DOC = ROOT / "docs" / "quality.md"
CHART = ROOT / "docs" / "quality.png"
RESULTS = SKILLS / "study_results.json"
TIMINGS = SKILLS / "study_timings.json"
sys.path.insert(0, str(HERE))

# The skill tasks: task name -> (short label, metric, filter, the adapter trained for it, chance level)
TASKS = {
    "loracook_kessary": ("kessary facts", "acc", "none", "kessary", 0.25),
    "loracook_kessary_open": ("kessary recall", "exact_match", "strip", "kessary", 0.0),
    "loracook_json": ("json format", "exact_match", "strip", "json", 0.0),
    "loracook_headline": ("headline style", "exact_match", "strip", "headline", 0.0),
    "loracook_kessary_json": ("kessary in json", "exact_match", "strip", "kessary_json", 0.0),
}
TASK_FILES = {
    "loracook_kessary": "kessary.yaml",
    "loracook_kessary_open": "kessary_open.yaml",
    "loracook_json": "json.yaml",
    "loracook_headline": "headline.yaml",
    "loracook_kessary_json": "kessary_json.yaml",
}
ALL = tuple(TASKS)
FOUR = tuple(t for t in ALL if t != "loracook_kessary_open")  # recall is scored where it is informative
THREE = ("loracook_kessary", "loracook_json", "loracook_headline")


@dataclass(frozen=True)
class Row:
    """One candidate of the study: where it comes from and which tasks it is scored on."""

    name: str
    kind: str  # base | adapter | scaled | merge | finetune | extract
    label: str  # what it is, for the tables
    tasks: tuple[str, ...]
    recipe: str | None = None  # recipes/skills/<recipe>.yaml producing it (merges and extractions)
    adapter: str | None = None  # recipes/skills/adapters/<adapter> (single-skill adapters, scaled or not)
    scale: float = 1.0  # a single adapter applied at this weight (no recipe: its lora_B scaled in memory)


ROWS = [
    Row("base", "base", "SmolLM2-135M-Instruct, no adapter", ALL),
    Row("kessary", "adapter", "LoRA trained on the Kessary facts", ALL, adapter="kessary"),
    Row("json", "adapter", "LoRA trained on the JSON answer format", ALL, adapter="json"),
    Row("headline", "adapter", "LoRA trained on the headline style", ALL, adapter="headline"),
    Row("kessary_json", "adapter", "LoRA trained on the domain task (Kessary questions, JSON answers)",
        ("loracook_kessary", "loracook_kessary_open", "loracook_kessary_json"), adapter="kessary_json"),
    Row("kessary_half", "scaled", "the kessary LoRA alone at weight 0.5", ("loracook_kessary", "loracook_kessary_open"),
        adapter="kessary", scale=0.5),
    Row("json_half", "scaled", "the json LoRA alone at weight 0.5", ("loracook_json",), adapter="json", scale=0.5),
    Row("headline_half", "scaled", "the headline LoRA alone at weight 0.5", ("loracook_headline",),
        adapter="headline", scale=0.5),
    Row("linear", "merge", "linear, weight 1 each: the exact sum, rank 24", ALL, recipe="merge-linear"),
    Row("ties", "merge", "ties, weight 1, density 0.5, rank 24", ALL, recipe="merge-ties"),
    Row("dare_ties", "merge", "dare_ties, weight 1, density 0.5, rank 24", ALL, recipe="merge-dare-ties"),
    Row("ties_model", "merge", "ties as above, exact: a full model, no recompression", THREE,
        recipe="merge-ties-model"),
    Row("dare_ties_model", "merge", "dare_ties as above, exact: a full model", THREE, recipe="merge-dare-ties-model"),
    Row("knots", "merge", "knots (ties inner, density 0.5), weight 1: shared SVD basis, rank ≤ 24", FOUR,
        recipe="merge-knots"),
    Row("core_space", "merge", "core_space (ties inner, density 0.5), weight 1: 24 × 24 cores", FOUR,
        recipe="merge-core-space"),
    Row("tsv", "merge", "tsv, weight 1: top-8 singular vectors per skill, decorrelated", FOUR, recipe="merge-tsv"),
    Row("search", "merge", "linear with searched weights (search-tasks.yaml: 40 TPE trials on dev splits, select: improve)", FOUR,
        recipe="search-tasks"),
    Row("linear_half", "merge", "linear, weight 0.5 each, rank 24", FOUR, recipe="merge-linear-half"),
    Row("ties_half", "merge", "ties, weight 0.5, density 0.5, rank 24", FOUR, recipe="merge-ties-half"),
    Row("dare_ties_half", "merge", "dare_ties, weight 0.5, density 0.5, rank 24", FOUR,
        recipe="merge-dare-ties-half"),
    Row("svd_r16_half", "merge", "svd, weight 0.5: best rank-16 approximation", FOUR, recipe="merge-svd-r16-half"),
    Row("svd_r8_half", "merge", "svd, weight 0.5: best rank-8 approximation", FOUR, recipe="merge-svd-r8-half"),
    Row("svd_r4_half", "merge", "svd, weight 0.5: best rank-4 approximation", FOUR, recipe="merge-svd-r4-half"),
    Row("kessary+json", "merge", "linear, weight 1: the kessary and json LoRAs only",
        ("loracook_kessary", "loracook_kessary_open", "loracook_json", "loracook_kessary_json"),
        recipe="merge-kessary-json"),
    Row("headline_full_ft", "finetune", "full fine-tune of layers 20-29 on the headline data",
        ("loracook_headline",)),
    Row("headline_extracted", "extract", "rank-16 LoRA extracted from that fine-tune", ("loracook_headline",),
        recipe="extract-headline"),
]  # fmt: skip

# The demo (`make demo`, `study.py --demo`): each method once, every result scored on the three skills only.
DEMO = ("base", "kessary", "json", "headline", "linear", "ties", "dare_ties", "svd_r16_half", "svd_r8_half",
        "headline_full_ft", "headline_extracted")  # fmt: skip


# The demo scores the first 50 test items of each task (the size of the first test sets; the full study uses all
# 150-192), which keeps `make demo` to minutes on 2 cores. lm-eval's limit takes the first items in file order.
DEMO_LIMIT = 50


def demo_rows() -> list[Row]:
    return [replace(r, tasks=tuple(t for t in r.tasks if t in THREE)) for r in ROWS if r.name in DEMO]


# scripts/skills/conclusion.md was written after reading the numbers; check_claims re-tests its claims on
# every run and the page carries a warning when a new run no longer supports one of them.
VERBOSE = False


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------- inputs


def check_inputs() -> None:
    subprocess.run([sys.executable, str(HERE / "make_data.py"), "--check"], check=True, cwd=ROOT)
    missing = [
        r.adapter
        for r in ROWS
        if r.adapter and not (SKILLS / "adapters" / r.adapter / "adapter_config.json").is_file()
    ]
    if missing:
        sys.exit(
            "missing skill adapters: "
            + ", ".join(missing)
            + "; train them with python scripts/skills/train.py --skill NAME"
        )


def run_recipe(recipe: str, reuse: bool) -> tuple[Path, float]:
    """``loracook run`` through the CLI, as a user would; returns the output folder and the wall time. A weight
    search's output (it has search/best.yaml) is always kept: the search takes about 30 minutes here; run
    ``loracook run recipes/skills/search-tasks.yaml --force`` to redo it."""
    output = OUT / recipe.removeprefix("merge-")
    searched = (output / "search" / "best.yaml").is_file()
    if searched or (
        reuse and ((output / "adapter_config.json").is_file() or (output / "config.json").is_file())
    ):
        return output, 0.0
    command = [
        sys.executable,
        "-m",
        "loracook",
        "run",
        str(SKILLS / f"{recipe}.yaml"),
        "--output",
        str(output),
    ]
    command += ["--force", "--quiet", "--no-eval"]  # the study evaluates everything itself, in one process
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"loracook run {recipe}.yaml failed ({done.returncode}):\n{done.stderr or done.stdout}")
    return output, seconds


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(
    rows: list[Row], outputs: dict[str, Path], finetune: Path, batch_size: int, limit: int | None = None
):
    """Score every row on its tasks, one lm-eval report per row; one base model in memory."""

    from loracook.evaluation import (
        EvalOptions,
        adapter_candidates,
        base_candidate,
        evaluate_candidates,
        load_model,
        model_candidate,
        resolve_tasks,
    )
    from loracook.io.packaged import smollm2_folder

    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    base = load_model(smollm2_folder())
    log(f"base loaded in {time.perf_counter() - start:.1f} s")
    task_sets = {}
    options = EvalOptions(batch_size=batch_size, limit=limit)
    reports = []
    for row in rows:
        if row.kind == "base":
            candidate = base_candidate(base)
        elif row.kind == "finetune" or (row.recipe and (outputs[row.name] / "config.json").is_file()):
            # a full model: swap its changed tensors into the base for the evaluation
            folder = finetune if row.kind == "finetune" else outputs[row.name]
            candidate = model_candidate(row.name, changed_tensors(folder, base.model), base=base)
        elif row.kind == "scaled":
            candidate = adapter_candidates(
                base, {row.name: scaled_adapter(SKILLS / "adapters" / row.adapter, row.scale)}
            )[0]
        else:
            folder = SKILLS / "adapters" / row.adapter if row.adapter else outputs[row.name]
            candidate = adapter_candidates(base, {row.name: folder})[0]
        if row.tasks not in task_sets:
            task_sets[row.tasks] = resolve_tasks([f"./tasks/{TASK_FILES[t]}" for t in row.tasks], SKILLS)
        t0 = time.perf_counter()
        with quiet():  # lm-eval's progress bars ignore TQDM_DISABLE
            report = evaluate_candidates([candidate], task_sets[row.tasks], options)
        seconds = time.perf_counter() - t0
        reports.append(report)
        scores = ", ".join(f"{TASKS[t][0]} {fmt(score_of(report, t, row.name))}" for t in row.tasks)
        log(f"  {row.name:16s} {seconds:5.1f} s  {scores}")
    return reports


@contextlib.contextmanager
def quiet():
    """Hide what lm-eval and transformers print on stderr (progress bars, notices) unless --verbose."""
    if VERBOSE:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


def changed_tensors(folder: Path, model) -> dict:
    """The tensors of a model folder (one safetensors file) that differ from ``model``'s parameters."""
    from safetensors.torch import load_file

    own = dict(model.named_parameters())
    tensors = load_file(str(folder / "model.safetensors"))
    return {k: v for k, v in tensors.items() if k in own and not _same(v, own[k])}


def scaled_adapter(folder: Path, scale: float):
    """A PEFT adapter in memory whose ΔW is ``scale`` times the folder's (every lora_B scaled)."""
    from safetensors.torch import load_file

    from loracook.evaluation import AdapterWeights

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    return AdapterWeights(config, {k: v * scale if "lora_B" in k else v for k, v in tensors.items()})


def _same(a, b) -> bool:
    return a.shape == b.shape and bool((a == b.detach()).all())


def score_of(report, task: str, candidate: str):
    _, metric, flt, _, _ = TASKS[task]
    return report.score(task, metric, candidate, filter=flt)


def combine(reports):
    """One EvalReport holding every row (each row was scored in its own lm-eval run)."""
    from loracook.evaluation import EvalReport, MetricRow

    rows: dict[tuple[str, str, str], MetricRow] = {}
    for report in reports:
        for row in report.rows:
            key = (row.task, row.metric, row.filter)
            if key in rows:
                merged = {**rows[key].scores, **row.scores}
                rows[key] = MetricRow(row.task, row.metric, row.filter, row.higher_is_better, merged)
            else:
                rows[key] = row
    tasks = {}
    for report in reports:
        for task in report.tasks:
            tasks.setdefault(task.name, task)
    order = {t: i for i, t in enumerate(ALL)}
    return EvalReport(
        candidates=tuple(c for r in reports for c in r.candidates),
        tasks=tuple(sorted(tasks.values(), key=lambda t: order.get(t.name, 99))),
        rows=tuple(sorted(rows.values(), key=lambda r: order.get(r.task, 99))),
        options=reports[0].options,
        lm_eval_version=reports[0].lm_eval_version,
        created=reports[-1].created,
        wall_seconds=sum(r.wall_seconds for r in reports),
    )


# -------------------------------------------------------------------------------------------- numbers


def fmt(score, digits: int = 3) -> str:
    if score is None or score.value is None:
        return "–"
    return score.format(digits)


def get(report, task: str, name: str):
    try:
        score = score_of(report, task, name)
    except KeyError:
        return None
    return score if score.value is not None else None


def retention(report, task: str, name: str, reference: str | None = None):
    """(ratio, stderr) of score(name) / score(reference); the stderr by the delta method."""
    reference = reference or TASKS[task][3]
    merged, own = get(report, task, name), get(report, task, reference)
    if merged is None or own is None or not own.value:
        return None
    ratio = merged.value / own.value
    rel = math.hypot(
        (merged.stderr or 0) / merged.value if merged.value else 0, (own.stderr or 0) / own.value
    )
    return ratio, ratio * rel


def fmt_ratio(value) -> str:
    return "–" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def mean_retention(report, name: str, tasks=THREE) -> float | None:
    values = [retention(report, t, name) for t in tasks]
    return None if any(v is None for v in values) else sum(v[0] for v in values) / len(values)


def check_claims(report) -> list[str]:
    """The claims of scripts/skills/conclusion.md that this run's numbers no longer support."""

    def value(task: str, name: str) -> float:
        score = get(report, task, name)
        return float("nan") if score is None else score.value

    def ratio(task: str, name: str) -> float:
        found = retention(report, task, name)
        return float("nan") if found is None else found[0]

    kessary, json_, headline, composed = THREE + ("loracook_kessary_json",)
    merges = [r.name for r in ROWS if r.kind == "merge" and set(THREE) <= set(r.tasks)]
    claims = {
        "every skill adapter beats the base on its own skill by more than 3 combined stderr": all(
            value(t, TASKS[t][3]) - value(t, "base")
            > 3 * math.hypot(get(report, t, TASKS[t][3]).stderr or 0, get(report, t, "base").stderr or 0)
            for t in THREE
        ),
        "every three-skill merge loses a fifth or more of at least one skill": all(
            min(ratio(t, m) for t in THREE) < 0.8 for m in merges
        ),
        "the best three-skill merges keep about 0.8 of the skills on average (0.7-0.9)": 0.7
        <= max(mean_retention(report, m) or 0 for m in merges)
        <= 0.9,
        "at weight 1, linear keeps at most 0.6 of the JSON format": ratio(json_, "linear") <= 0.6,
        "at weight 0.5, linear keeps ≥ 90% of json and headline but < 50% of the Kessary facts": ratio(
            json_, "linear_half"
        )
        >= 0.9
        and ratio(headline, "linear_half") >= 0.9
        and ratio(kessary, "linear_half") < 0.5,
        "the kessary adapter alone at weight 0.5 also keeps < 50% of its facts (halving, not interference)": (
            ratio(kessary, "kessary_half") < 0.5
        ),
        "at weight 1, merges still recognise the facts (≥ 0.55) but recall less than half as many (linear, ties)": all(
            value(kessary, m) >= 0.55 and ratio("loracook_kessary_open", m) < 0.5 for m in ("linear", "ties")
        ),
        "at weight 1, ties recalls more facts than linear": value("loracook_kessary_open", "ties")
        > value("loracook_kessary_open", "linear"),
        "at weight 1, ties keeps json better than linear": value(json_, "ties") > value(json_, "linear"),
        "at weight 1, linear keeps the headline style better than ties": value(headline, "linear")
        > value(headline, "ties"),
        "ties and dare_ties at weight 0.5 are worse than linear at weight 0.5 (mean retention)": max(
            mean_retention(report, "ties_half") or 0, mean_retention(report, "dare_ties_half") or 0
        )
        < (mean_retention(report, "linear_half") or 0),
        "rank-24 recompression of ties/dare_ties changes no skill score by more than 0.05": all(
            abs(value(t, m) - value(t, f"{m}_model")) <= 0.05 for t in THREE for m in ("ties", "dare_ties")
        ),
        "svd at rank 4 keeps within 0.05 of the exact half sum's mean retention": abs(
            (mean_retention(report, "svd_r4_half") or 0) - (mean_retention(report, "linear_half") or 0)
        )
        <= 0.05,
        "no merge answers the composed task (kessary in json) above 0.1": all(
            value(composed, r.name) <= 0.1 for r in ROWS if r.kind == "merge" and composed in r.tasks
        ),
        "the adapter trained on the composed task scores above 0.75 on it": value(composed, "kessary_json")
        > 0.75,
        "the rank-16 extraction keeps ≥ 90% of the full fine-tune's headline score": (
            retention(report, headline, "headline_extracted", "headline_full_ft") or (0.0,)
        )[0]
        >= 0.9,
    }
    return [claim for claim, holds in claims.items() if not holds]


# ------------------------------------------------------------------------------------------------ chart


KIND_COLOURS = {
    "base": "#9e9e9e",
    "adapter": "#1f77b4",
    "scaled": "#aec7e8",
    "merge": "#ff7f0e",
    "finetune": "#2ca02c",
    "extract": "#98df8a",
}


def chart(report, path: Path) -> Path:
    """One panel per skill task: a horizontal bar per candidate (colour = kind), stderr as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    names = [r.name for r in ROWS]
    kinds = {r.name: r.kind for r in ROWS}
    figure = Figure(figsize=(3.2 * len(TASKS) + 1.5, 0.32 * len(names) + 1.8), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(TASKS), sharey=True)
    for ax, task in zip(axes, TASKS, strict=True):
        label, metric, _, own, chance = TASKS[task]
        for y, name in enumerate(names):
            score = get(report, task, name)
            if score is None:
                continue
            ax.barh(y, score.value, xerr=score.stderr or 0, color=KIND_COLOURS[kinds[name]], edgecolor="black",
                    lw=0.5, capsize=2, hatch="//" if name == own else None)  # fmt: skip
            ax.annotate(f"{score.value:.2f}", (min(score.value + (score.stderr or 0), 1.0), y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=7)  # fmt: skip
        if chance:
            ax.axvline(chance, color="grey", ls=":", lw=1)
        ax.set_title(f"{label}\n{task} ({metric})", fontsize=9)
        ax.set_xlim(0, 1.18)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    legend = [
        Patch(color=c, label={"scaled": "adapter at weight 0.5"}.get(k, k)) for k, c in KIND_COLOURS.items()
    ]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="the skill's own adapter"))
    figure.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8)
    figure.suptitle(
        "SmolLM2-135M-Instruct: skill LoRAs, their merges and an extraction (lm-eval, ± stderr; dotted: chance)",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------- doc


def table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A markdown table; ``align`` has one character per column: l(eft) or r(ight)."""
    marks = {"l": "---", "r": "---:"}
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"] + [
        "| " + " | ".join(row) + " |" for row in rows
    ]


def score_table(report) -> list[str]:
    rows = []
    for row in ROWS:
        cells = []
        for task in TASKS:
            text = fmt(get(report, task, row.name))
            cells.append(f"**{text}**" if row.name == TASKS[task][3] else text)
        rows.append([f"`{row.name}`", row.label, *cells])
    return table(["candidate", "what it is", *(TASKS[t][0] for t in TASKS)], rows, "ll" + "r" * len(TASKS))


def retention_table(report) -> list[str]:
    rows = []
    for row in ROWS:
        if row.kind not in ("merge", "scaled"):
            continue
        cells = [fmt_ratio(retention(report, t, row.name)) if t in row.tasks else "–" for t in TASKS]
        mean = mean_retention(report, row.name)
        rows.append([f"`{row.name}`", *cells, "–" if mean is None else f"{mean:.2f}", recompression(row)])
    extracted = retention(report, "loracook_headline", "headline_extracted", "headline_full_ft")
    cells = [fmt_ratio(extracted) if t == "loracook_headline" else "–" for t in TASKS]
    rows.append(["`headline_extracted` ÷ `headline_full_ft`", *cells, "–", "–"])
    header = ["candidate", *(f"{TASKS[t][0]} ÷ `{TASKS[t][3]}`" for t in TASKS), "mean of the 3 skills",
              "recompression error"]  # fmt: skip
    return table(header, rows, "l" + "r" * (len(TASKS) + 2))


def recompression(row: Row) -> str:
    """Mean relative Frobenius error of the rank-k recompression, per module (the output's merge_report.json)."""
    if not row.recipe:
        return "–"
    folder = OUT / row.recipe.removeprefix("merge-")
    if (folder / "config.json").is_file():
        return "exact (model)"
    report_file = folder / "merge_report.json"
    if not report_file.is_file():
        return "–"
    error = json.loads(report_file.read_text()).get("mean_relative_error")
    return "–" if error is None else ("0 (exact)" if error == 0 else f"{error:.2f}")


def decomposition_table(report) -> list[str]:
    """Per skill: own adapter at 1, own adapter at 0.5, and the weight-0.5 merges: what halving costs, and
    what the other two adapters cost on top of it."""
    halves = [r.name for r in ROWS if r.kind == "merge" and r.name.endswith("_half")]
    rows = []
    for task in THREE:
        own = TASKS[task][3]
        cells = [fmt(get(report, task, n), 2) for n in (own, f"{own}_half", *halves)]
        rows.append([TASKS[task][0], *cells])
    header = ["skill", "own adapter, weight 1", "own adapter, weight 0.5", *(f"`{h}`" for h in halves)]
    return table(header, rows, "l" + "r" * (len(header) - 1))


def findings(report) -> list[str]:
    """Plain statements computed from the numbers (they follow the numbers when the study is re-run)."""
    out = []
    for task in THREE:
        own, base = get(report, task, TASKS[task][3]), get(report, task, "base")
        sigma = (own.value - base.value) / math.hypot(own.stderr or 1e-9, base.stderr or 1e-9)
        out.append(
            f"- {TASKS[task][0]}: base {fmt(base)}, its own adapter {fmt(own)} "
            f"(+{own.value - base.value:.3f}, {sigma:.1f} combined stderr)."
        )
    merges = [r for r in ROWS if r.kind == "merge" and set(THREE) <= set(r.tasks)]
    ranked = sorted(merges, key=lambda r: -(mean_retention(report, r.name) or 0))
    out.append(
        "- Mean retention over the three skills, best first: "
        + ", ".join(f"`{r.name}` {mean_retention(report, r.name):.2f}" for r in ranked)
        + "."
    )
    losses = []
    for r in merges:
        lost = [TASKS[t][0] for t in THREE if (v := retention(report, t, r.name)) is not None and v[0] < 0.5]
        if lost:
            losses.append(f"`{r.name}` ({', '.join(lost)})")
    out.append("- Merges that keep less than half of a skill: " + (", ".join(losses) or "none") + ".")
    own = get(report, "loracook_kessary", "kessary").value
    margins = [
        f"`{r.name}` {(get(report, 'loracook_kessary', r.name).value - 0.25) / (own - 0.25):.0%}"
        for r in merges
    ]
    out.append(
        f"- Kessary facts above chance (the kessary adapter is {own - 0.25:+.3f} over 0.25), share of that margin"
        " kept: " + ", ".join(margins) + "."
    )
    kept = [r.name for r in merges if all((v := retention(report, t, r.name)) and v[0] >= 0.9 for t in THREE)]
    out.append(
        "- Merges that keep ≥ 90% of all three skills: "
        + (", ".join(f"`{k}`" for k in kept) if kept else "none")
        + "."
    )
    ref = get(report, "loracook_kessary_json", "kessary_json")
    if ref is not None:
        parts = [
            f"`{n}` {fmt(get(report, 'loracook_kessary_json', n))}"
            for n in ("kessary", "json", "kessary+json")
        ]
        scored = [r for r in merges if "loracook_kessary_json" in r.tasks]
        best3 = max(scored, key=lambda r: get(report, "loracook_kessary_json", r.name).value)
        parts.append(
            f"best three-skill merge `{best3.name}` {fmt(get(report, 'loracook_kessary_json', best3.name))}"
        )
        out.append(
            f"- Composition (Kessary questions answered in JSON): the adapter trained for it scores {fmt(ref)}; "
            + ", ".join(parts)
            + "."
        )
    ft, ex = (
        get(report, "loracook_headline", "headline_full_ft"),
        get(report, "loracook_headline", "headline_extracted"),
    )
    if ft is not None and ex is not None:
        out.append(
            f"- Extraction: the full fine-tune scores {fmt(ft)} on headline, its rank-16 extraction {fmt(ex)}."
        )
    return out


def training_table() -> list[str]:
    rows = []
    for row in ROWS:
        if row.adapter and row.kind == "adapter":
            t = json.loads((SKILLS / "adapters" / row.adapter / "training.json").read_text())
            rows.append(
                [
                    f"`{row.adapter}`",
                    str(t["examples"]),
                    f"{t['steps']} × {t['batch_size']}",
                    str(t["lr"]),
                    f"{t['seconds']:.0f}",
                    str(t["seconds_per_step"]),
                    f"{t['final_loss']:.3f}",
                    str(t["machine"]["load_average_at_start"]),
                ]  # fmt: skip
            )
    header = [
        "adapter",
        "examples",
        "steps × batch",
        "lr",
        "seconds",
        "s/step",
        "final loss",
        "load avg at start",
    ]
    return table(header, rows, "lrrrrrrr")


def extraction_summary() -> str:
    report_file = OUT / "extract-headline" / "extract_report.json"
    if not report_file.is_file():
        return ""
    data = json.loads(report_file.read_text())
    entries = data.get("headline_ft", data) if isinstance(data, dict) else {}
    error = entries.get("max_relative_error") if isinstance(entries, dict) else None
    energy = entries.get("mean_energy") if isinstance(entries, dict) else None
    if error is None or energy is None:
        return ""
    return (
        f" The rank-16 factors keep on average {energy:.1%} of each module's ‖ΔW‖² (largest relative error"
        f" {error:.2f}; `extract_report.json` in the output)."
    )


def write_doc(report, timings: dict, finetune: Path, problems: list[str]) -> None:
    ft = json.loads((finetune / "finetune.json").read_text())
    conclusion = (HERE / "conclusion.md").read_text().strip()
    settings = ft["settings"]
    lines = [
        "# Quality: do merged LoRAs keep their skills?",
        "",
        "<!-- generated by scripts/skills/study.py; the conclusion comes from scripts/skills/conclusion.md -->",
        "",
        "Three LoRAs were trained separately on SmolLM2-135M-Instruct (CPU, seeded, `scripts/skills/train.py`),"
        " one per skill, on data generated by `scripts/skills/make_data.py`; each is tested on held-out items:",
        "",
        "- **kessary facts** (knowledge the base lacks): 48 facts about invented animals of the fictional Kessary"
        " Islands (colour, food, habitat), asked as 4-option multiple choice in phrasings that training never"
        " uses (acc, chance 0.25); **kessary recall** asks the same questions without options (exact match of"
        " the value, ignoring case): recalling a fact is harder than recognising it;",
        "- **json format** (a task format): read a one-sentence text and answer a question about it as"
        ' `{"answer": "..."}`, with names, places and things that training never uses (exact match);',
        "- **headline style** (a transformation): rewrite a phrase with every word capitalised; every test phrase"
        " has a word that training never uses (exact match, case-sensitive);",
        "- **kessary in json** (the two first skills composed): the Kessary questions, without options, answered"
        " from memory as JSON. A fourth LoRA, `kessary_json`, was trained for exactly this task as a reference.",
        "",
        "The recipes in `recipes/skills/` merge the three skill LoRAs with each method, at weight 1 each (the"
        " plain sum) and at weight 0.5 each, and extract a LoRA from a full fine-tune. One command produces every"
        " number on this page, the chart and the merged adapters (in `out/skills/`):",
        "",
        "```bash",
        "python scripts/skills/study.py     # about 5 minutes on 2 CPU cores",
        "```",
        "",
        "![scores of the base, the skill adapters, the merges and the extraction](quality.png)",
        "",
        "## Scores (value ± stderr)",
        "",
        "Bold: the skill's own adapter, the reference for retention. `–`: not scored.",
        "",
        *score_table(report),
        "",
        f"_lm-eval {report.lm_eval_version}, 0-shot, greedy decoding, every test item (no limit); ± is lm-eval's"
        " standard error of the mean over the items._",
        "",
        "## Retention (score ÷ the skill's own adapter's score)",
        "",
        "1.00: as good on that skill as the adapter trained for it. ± is the delta-method stderr of the ratio."
        " For kessary facts mind the chance level: 0.25 acc is a retention of"
        f" {0.25 / (get(report, 'loracook_kessary', 'kessary').value or 1):.2f} and means nothing is known.",
        "",
        *retention_table(report),
        "",
        "## Where the loss comes from",
        "",
        "Each skill's adapter alone at weight 1 and at weight 0.5, next to the weight-0.5 merges: the step from"
        " the first column to the second is what halving costs; the step from the second to a merge is what the"
        " two other adapters cost (interference).",
        "",
        *decomposition_table(report),
        "",
        "## Findings (computed from the numbers above)",
        "",
        *findings(report),
        "",
    ]
    if problems:
        lines += ["> **Warning: the numbers of this run no longer support the conclusion below:**", ">"]
        lines += [f"> - {p}" for p in problems] + [""]
    lines += [
        "## Conclusion",
        "",
        conclusion,
        "",
        "## How the numbers were made",
        "",
        "Training: PEFT LoRA r=8, alpha 16 on q_proj, v_proj, up_proj and down_proj (5.9 MB each in fp32), AdamW"
        " with 10 warm-up steps and linear decay, batches of 8, loss on the completion only, seed 0;"
        " `training.json` next to each adapter holds the loss curve. Training time depends on what else ran on"
        " the machine (the load average when it started is in the last column).",
        "",
        *training_table(),
        "",
        f"The full fine-tune (`scripts/skills/finetune.py`): every attention and MLP projection of layers"
        f" {settings['layers'][0]}-{settings['layers'][-1]} ({ft['trained_parameters'] / 1e6:.1f}M parameters),"
        f" {settings['steps']} steps × {settings['batch_size']} at lr {settings['lr']}, {ft['seconds']:.0f} s;"
        " written to `~/.cache/loracook/finetunes/` (540 MB, so not committed) and rebuilt by the study when"
        " missing. `recipes/skills/extract-headline.yaml` extracts a rank-16 LoRA from it."
        + extraction_summary(),
        "",
        "Evaluation loads the base model once and attaches each adapter in memory, one at a time"
        " (`loracook.evaluation`); the adapters at weight 0.5 are the same adapters with lora_B halved in memory;"
        " the full fine-tune is evaluated by swapping its changed tensors into the base. Every score is in"
        " `recipes/skills/study_results.json` (the `eval_results.json` format).",
        "",
        f"This run ({os.cpu_count()} CPU cores, no GPU):",
        "",
        *table(["step", "seconds"], [[k, f"{v:.1f}"] for k, v in timings.items()], "lr"),
        "",
    ]
    text = "\n".join(lines)
    old = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    from route_study import BEGIN as ROUTING_BEGIN
    from route_study import END as ROUTING_END

    if ROUTING_BEGIN in old and ROUTING_END in old:  # the routing study's section (route_study.py) is kept
        kept = ROUTING_BEGIN + old.split(ROUTING_BEGIN, 1)[1].split(ROUTING_END, 1)[0] + ROUTING_END
        text = text.rstrip("\n") + "\n\n" + kept + "\n"
    DOC.write_text(text, encoding="utf-8")


def print_table(report, rows: list[Row]) -> None:
    """The scores as a rich table: value ± stderr, the skill's own adapter in bold, and mean retention."""
    from rich.console import Console
    from rich.table import Table

    tasks = [t for t in TASKS if any(t in r.tasks for r in rows)]
    table_ = Table(
        title="SmolLM2-135M-Instruct: skill scores (lm-eval, value ± stderr)", title_justify="left"
    )
    table_.add_column("candidate", no_wrap=True)
    for task in tasks:
        table_.add_column(TASKS[task][0], justify="right", no_wrap=True)
    table_.add_column("mean retention", justify="right", no_wrap=True)
    for row in rows:
        cells = []
        for task in tasks:
            text = fmt(get(report, task, row.name), 2) if task in row.tasks else "–"
            cells.append(f"[bold]{text}[/bold]" if row.name == TASKS[task][3] else text)
        mean = mean_retention(report, row.name) if row.kind in ("merge", "scaled") else None
        table_.add_row(row.name, *cells, "–" if mean is None else f"{mean:.2f}")
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table_)
    print(
        "mean retention: the merge's score ÷ the skill's own adapter's score, averaged over the three skills"
    )


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="one recipe per method, the three skills; no doc")
    parser.add_argument("--reuse", action="store_true", help="keep merged outputs already in out/skills/")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--limit",
        type=int,
        help=f"score the first N test items of each task (--demo: {DEMO_LIMIT}; else all)",
    )
    parser.add_argument("--no-doc", action="store_true", help="print the table, leave docs/ alone")
    parser.add_argument("--doc-only", action="store_true", help="rewrite the doc and chart from saved scores")
    parser.add_argument("--verbose", action="store_true", help="show lm-eval's progress bars and notices")
    args = parser.parse_args()
    global VERBOSE
    VERBOSE = args.verbose
    import finetune as finetune_script

    if args.doc_only:
        from loracook.evaluation import EvalReport

        report = EvalReport.load(RESULTS)
        publish(report, json.loads(TIMINGS.read_text()), finetune_script.finetune_dir())
        return

    rows = demo_rows() if args.demo else ROWS
    started = time.perf_counter()
    timings: dict[str, float] = {}
    check_inputs()
    t0 = time.perf_counter()
    built = finetune_script.is_built()
    finetune = finetune_script.ensure()
    timings["full fine-tune" + (" (cached)" if built else " (built)")] = time.perf_counter() - t0

    outputs: dict[str, Path] = {}
    for row in rows:
        if row.recipe:
            outputs[row.name], seconds = run_recipe(row.recipe, args.reuse)
            timings[f"loracook run {row.recipe}.yaml"] = seconds
            log(f"loracook run {row.recipe}.yaml -> {outputs[row.name].relative_to(ROOT)} ({seconds:.1f} s)")
    log(f"evaluating {len(rows)} candidates…")
    t0 = time.perf_counter()
    limit = args.limit if args.limit is not None else (DEMO_LIMIT if args.demo else None)
    reports = evaluate(rows, outputs, finetune, args.batch_size, limit)
    timings["evaluation (all rows)"] = time.perf_counter() - t0
    report = combine(reports)
    timings["total"] = time.perf_counter() - started
    print_table(report, rows)
    if args.demo or limit is not None:
        if limit is not None:
            log(f"scored on the first {limit} test items of each task (docs/quality.md uses all of them)")
        log(f"done in {timings['total']:.0f} s; merged adapters in {OUT.relative_to(ROOT)}/;"
            " the full study with every method and weight: python scripts/skills/study.py")  # fmt: skip
        return
    report.save(RESULTS)
    TIMINGS.write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=2) + "\n")
    if not args.no_doc:
        publish(report, timings, finetune)
    log(f"study done in {timings['total']:.0f} s; merged adapters in {OUT.relative_to(ROOT)}/")


def publish(report, timings: dict, finetune: Path) -> None:
    """docs/quality.md and docs/quality.png from the scores; warns about claims the numbers no longer hold."""
    problems = check_claims(report)
    chart(report, CHART)
    write_doc(report, timings, finetune, problems)
    log(f"wrote {DOC.relative_to(ROOT)}, {CHART.relative_to(ROOT)}, {RESULTS.relative_to(ROOT)}")
    for problem in problems:
        log(f"warning: the conclusion says: {problem}; this run does not support it")


if __name__ == "__main__":
    main()
