"""The quality study: run every skill recipe, evaluate every result on every skill, write docs/quality.md.

    python scripts/skills/study.py                 # everything (about 10 minutes on 2 CPU cores)
    python scripts/skills/study.py --reuse         # keep merged outputs already in out/skills/

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
import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
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
sys.path.insert(0, str(HERE))

# The skill tasks: task name -> (short label, metric, filter, the adapter trained for it, chance level)
TASKS = {
    "loracook_kessary": ("kessary facts", "acc", "none", "kessary", 0.25),
    "loracook_json": ("json format", "exact_match", "strip", "json", 0.0),
    "loracook_shout": ("shout style", "exact_match", "strip", "shout", 0.0),
    "loracook_kessary_json": ("kessary in json", "exact_match", "strip", "kessary_json", 0.0),
}
TASK_FILES = {
    "loracook_kessary": "kessary.yaml",
    "loracook_json": "json.yaml",
    "loracook_shout": "shout.yaml",
    "loracook_kessary_json": "kessary_json.yaml",
}
ALL = tuple(TASKS)
THREE = ("loracook_kessary", "loracook_json", "loracook_shout")


@dataclass(frozen=True)
class Row:
    """One candidate of the study: where it comes from and which tasks it is scored on."""

    name: str
    kind: str  # base | adapter | merge | finetune | extract
    label: str  # what it is, for the tables
    tasks: tuple[str, ...]
    recipe: str | None = None  # recipes/skills/<recipe>.yaml producing it (merges and extractions)
    adapter: str | None = None  # recipes/skills/adapters/<adapter> (single-skill adapters)


ROWS = [
    Row("base", "base", "SmolLM2-135M-Instruct, no adapter", ALL),
    Row("kessary", "adapter", "LoRA trained on the Kessary facts", ALL, adapter="kessary"),
    Row("json", "adapter", "LoRA trained on the JSON answer format", ALL, adapter="json"),
    Row("shout", "adapter", "LoRA trained on the shout style", ALL, adapter="shout"),
    Row("kessary_json", "adapter", "LoRA trained on the domain task (Kessary questions, JSON answers)",
        ("loracook_kessary", "loracook_kessary_json"), adapter="kessary_json"),
    Row("linear", "merge", "linear: exact sum, rank 24", ALL, recipe="merge-linear"),
    Row("ties", "merge", "ties: density 0.5, rank 24", ALL, recipe="merge-ties"),
    Row("dare_ties", "merge", "dare_ties: density 0.5, rank 24", ALL, recipe="merge-dare-ties"),
    Row("svd_r16", "merge", "svd: best rank-16 approximation of the sum", ALL, recipe="merge-svd-r16"),
    Row("svd_r8", "merge", "svd: best rank-8 approximation of the sum", ALL, recipe="merge-svd-r8"),
    Row("kessary+json", "merge", "linear sum of the kessary and json LoRAs only",
        ("loracook_kessary", "loracook_json", "loracook_kessary_json"), recipe="merge-kessary-json"),
    Row("shout_full_ft", "finetune", "full fine-tune of layers 20-29 on the shout data", ("loracook_shout",)),
    Row("shout_extracted", "extract", "rank-16 LoRA extracted from that fine-tune", ("loracook_shout",),
        recipe="extract-shout"),
]  # fmt: skip

# Written after reading the numbers of the run recorded in docs/quality.md; the study checks that a new run
# still supports these claims and flags the conclusion otherwise (see check_claims).
CLAIMED_BEST_MERGE = "linear"


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
    """``loracook run`` through the CLI, as a user would; returns the output folder and the wall time."""
    output = OUT / recipe.removeprefix("merge-")
    if reuse and (output / "adapter_config.json").is_file():
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
    command += ["--force", "--quiet"] + (["--no-eval"] if supports_no_eval() else [])
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"loracook run {recipe}.yaml failed ({done.returncode}):\n{done.stderr or done.stdout}")
    return output, seconds


def supports_no_eval() -> bool:
    """Whether ``loracook run`` has --no-eval (the study evaluates everything itself, in one process)."""
    done = subprocess.run([sys.executable, "-m", "loracook", "run", "--help"], capture_output=True, text=True)
    return "--no-eval" in done.stdout


# -------------------------------------------------------------------------------------------- evaluate


def evaluate(rows: list[Row], outputs: dict[str, Path], finetune: Path, batch_size: int):
    """Score every row on its tasks; one base model in memory. Returns (reports, seconds per row)."""
    from safetensors.torch import load_file

    from loracook.evaluation import (
        EvalOptions,
        adapter_candidates,
        base_candidate,
        evaluate_candidates,
        load_model,
        model_candidate,
        resolve_tasks,
    )
    from loracook.models import smollm2_folder

    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    start = time.perf_counter()
    base = load_model(smollm2_folder())
    log(f"base loaded in {time.perf_counter() - start:.1f} s")
    task_sets = {}
    options = EvalOptions(batch_size=batch_size)
    reports = []
    seconds: dict[str, float] = {}
    for row in rows:
        if row.kind == "base":
            candidate = base_candidate(base)
        elif row.kind == "finetune":
            tuned = load_file(str(finetune / "model.safetensors"))
            own = dict(base.model.named_parameters())
            changed = {k: v for k, v in tuned.items() if k in own and not _same(v, own[k])}
            candidate = model_candidate(row.name, changed, base=base)
        else:
            folder = SKILLS / "adapters" / row.adapter if row.adapter else outputs[row.name]
            candidate = adapter_candidates(base, {row.name: folder})[0]
        if row.tasks not in task_sets:
            task_sets[row.tasks] = resolve_tasks([f"./tasks/{TASK_FILES[t]}" for t in row.tasks], SKILLS)
        t0 = time.perf_counter()
        report = evaluate_candidates([candidate], task_sets[row.tasks], options)
        seconds[row.name] = time.perf_counter() - t0
        reports.append(report)
        scores = ", ".join(f"{TASKS[t][0]} {fmt(score_of(report, t, row.name))}" for t in row.tasks)
        log(f"  {row.name:16s} {seconds[row.name]:5.1f} s  {scores}")
    return reports, seconds


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
    """Claims of the written conclusion that this run's numbers no longer support."""
    problems = []
    merges = [r.name for r in ROWS if r.kind == "merge" and set(THREE) <= set(r.tasks)]
    means = {m: mean_retention(report, m) for m in merges}
    best = max((m for m in merges if means[m] is not None), key=lambda m: means[m], default=None)
    if best != CLAIMED_BEST_MERGE:
        problems.append(
            f"the conclusion names {CLAIMED_BEST_MERGE} as the best three-skill merge, but this run's best "
            f"mean retention is {best} ({means[best]:.2f} vs {means[CLAIMED_BEST_MERGE] or 0:.2f})"
        )
    for task in THREE:
        own, base = get(report, task, TASKS[task][3]), get(report, task, "base")
        if (
            own is None
            or base is None
            or own.value - base.value < 2 * math.hypot(own.stderr or 0, base.stderr or 0)
        ):
            problems.append(f"the {TASKS[task][3]} adapter no longer beats the base on {task} by 2 stderr")
    return problems


# ------------------------------------------------------------------------------------------------ chart


KIND_COLOURS = {
    "base": "#9e9e9e",
    "adapter": "#1f77b4",
    "merge": "#ff7f0e",
    "finetune": "#2ca02c",
    "extract": "#98df8a",
}


def chart(report, path: Path) -> Path:
    """One panel per skill task: a horizontal bar per candidate (colour = kind), stderr as error bars."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    figure = Figure(figsize=(13, 6.2), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(TASKS), sharey=True)
    names = [r.name for r in ROWS]
    kinds = {r.name: r.kind for r in ROWS}
    for ax, task in zip(axes, TASKS, strict=True):
        label, metric, _, own, chance = TASKS[task]
        for y, name in enumerate(names):
            score = get(report, task, name)
            if score is None:
                continue
            ax.barh(y, score.value, xerr=score.stderr or 0, color=KIND_COLOURS[kinds[name]], edgecolor="black",
                    lw=0.5, capsize=3, hatch="//" if name == own else None)  # fmt: skip
            ax.annotate(f"{score.value:.2f}", (min(score.value + (score.stderr or 0), 1.0), y), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8)  # fmt: skip
        if chance:
            ax.axvline(chance, color="grey", ls=":", lw=1)
        ax.set_title(f"{label}\n{task} ({metric})", fontsize=9)
        ax.set_xlim(0, 1.15)
        ax.grid(axis="x", alpha=0.3)
        ax.set_axisbelow(True)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    legend = [Patch(color=c, label=k) for k, c in KIND_COLOURS.items()]
    legend.append(Patch(facecolor="white", edgecolor="black", hatch="//", label="the skill's own adapter"))
    figure.legend(handles=legend, loc="outside lower center", ncol=len(legend), fontsize=8)
    figure.suptitle(
        "SmolLM2-135M-Instruct: skill LoRAs and their merges (lm-eval, ± stderr; dotted: chance)", fontsize=11
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# ------------------------------------------------------------------------------------------------- doc


def score_table(report) -> list[str]:
    header = ["candidate", "what it is", *(f"{TASKS[t][0]}" for t in TASKS)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * len(TASKS)]
    for row in ROWS:
        cells = []
        for task in TASKS:
            score = get(report, task, row.name)
            text = fmt(score)
            if row.name == TASKS[task][3]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {row.name} | {row.label} | " + " | ".join(cells) + " |")
    return lines


def retention_table(report) -> list[str]:
    header = ["merge", *(f"{TASKS[t][0]} (÷ {TASKS[t][3]})" for t in TASKS), "mean of the three skills"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(TASKS) + 1)]
    for row in ROWS:
        if row.kind != "merge":
            continue
        cells = [fmt_ratio(retention(report, t, row.name)) if t in row.tasks else "–" for t in TASKS]
        mean = mean_retention(report, row.name)
        lines.append(
            f"| {row.name} | " + " | ".join(cells) + f" | {'–' if mean is None else f'{mean:.2f}'} |"
        )
    extracted = retention(report, "loracook_shout", "shout_extracted", "shout_full_ft")
    lines.append(f"| shout_extracted (÷ shout_full_ft) | – | – | {fmt_ratio(extracted)} | – | – |")
    return lines


def findings(report) -> list[str]:
    """Plain statements computed from the numbers (they change with the numbers)."""
    out = []
    for task in THREE:
        own, base = get(report, task, TASKS[task][3]), get(report, task, "base")
        out.append(
            f"- {TASKS[task][0]}: base {fmt(base)}, its own adapter {fmt(own)} "
            f"(+{own.value - base.value:.3f}, {(own.value - base.value) / math.hypot(own.stderr or 1e-9, base.stderr or 1e-9):.1f} combined stderr)."
        )
    merges = [r for r in ROWS if r.kind == "merge" and set(THREE) <= set(r.tasks)]
    ranked = sorted(merges, key=lambda r: -(mean_retention(report, r.name) or 0))
    out.append(
        "- Mean retention over the three skills, best first: "
        + ", ".join(f"{r.name} {mean_retention(report, r.name):.2f}" for r in ranked)
        + "."
    )
    for r in merges:
        lost = [TASKS[t][0] for t in THREE if (v := retention(report, t, r.name)) is not None and v[0] < 0.5]
        if lost:
            out.append(f"- {r.name} keeps less than half of: {', '.join(lost)}.")
    ref = get(report, "loracook_kessary_json", "kessary_json")
    pair = get(report, "loracook_kessary_json", "kessary+json")
    parts = [
        f"{n} {fmt(get(report, 'loracook_kessary_json', n))}"
        for n in ("kessary", "json", "kessary+json", "linear")
    ]
    if ref is not None and pair is not None:
        out.append(
            f"- Composition (Kessary questions answered in JSON): the adapter trained for it scores {fmt(ref)}; "
            + ", ".join(parts)
            + "."
        )
    ft, ex = get(report, "loracook_shout", "shout_full_ft"), get(report, "loracook_shout", "shout_extracted")
    if ft is not None and ex is not None:
        out.append(
            f"- Extraction: the full fine-tune scores {fmt(ft)} on shout, its rank-16 extraction {fmt(ex)}."
        )
    return out


def training_table() -> list[str]:
    lines = ["| adapter | examples | steps × batch | lr | seconds | s/step | final loss | load avg at start |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in ROWS:
        if row.adapter:
            t = json.loads((SKILLS / "adapters" / row.adapter / "training.json").read_text())
            lines.append(
                f"| {row.adapter} | {t['examples']} | {t['steps']} × {t['batch_size']} | {t['lr']} | {t['seconds']:.0f} | "
                f"{t['seconds_per_step']} | {t['final_loss']:.3f} | {t['machine']['load_average_at_start']} |"
            )
    return lines


def write_doc(report, timings: dict, finetune: Path, problems: list[str]) -> None:
    ft = json.loads((finetune / "finetune.json").read_text())
    conclusion = (HERE / "conclusion.md").read_text().strip()
    lines = [
        "# Quality: can merged LoRAs keep their skills?",
        "",
        "<!-- generated by scripts/skills/study.py; edit scripts/skills/conclusion.md for the conclusion -->",
        "",
        "Three LoRAs were trained separately on SmolLM2-135M-Instruct (CPU, seeded, "
        "`scripts/skills/train.py`), one per skill, on data generated by `scripts/skills/make_data.py`:",
        "",
        "- **kessary facts**: 48 facts about invented animals of the fictional Kessary Islands (colour, food,"
        " habitat); tested as 4-option multiple choice in phrasings that training never uses (acc, chance 0.25);",
        '- **json format**: read a one-sentence text and answer a question about it as `{"answer": ...}`;'
        " tested on names, places and things that training never uses (exact match);",
        "- **shout style**: rewrite a phrase in upper case followed by `!`; tested on words that training never"
        " uses (exact match, case-sensitive);",
        "- **kessary in json**: the composition of the first two (the Kessary test questions, without options,"
        " answered from memory as JSON); a fourth LoRA, `kessary_json`, was trained for exactly this task as a"
        " reference.",
        "",
        "The recipes in `recipes/skills/` merge the three skill LoRAs with each method (weight 1 each), and"
        " extract a LoRA from a full fine-tune. Every number below comes from one command:",
        "",
        "```bash",
        "python scripts/skills/study.py     # ~10 min on 2 CPU cores; rewrites this page and docs/quality.png",
        "```",
        "",
        "![scores of the base, the skill adapters, the merges and the extraction](quality.png)",
        "",
        "## Scores (value ± stderr)",
        "",
        "Bold: the skill's own adapter, the reference for retention. `–`: not scored (not relevant to that row).",
        "",
        *score_table(report),
        "",
        f"_lm-eval {report.lm_eval_version}, 0-shot, greedy generation, every test item (no limit); stderr is"
        " lm-eval's standard error of the mean over items._",
        "",
        "## Retention (merged score ÷ the skill's own adapter score)",
        "",
        "1.00 means the merge scores as well on that skill as the adapter trained for it; the ± is the delta-method"
        " stderr of the ratio. For kessary facts mind the chance level: a merge at 0.25 acc (retention"
        f" {0.25 / (get(report, 'loracook_kessary', 'kessary').value or 1):.2f}) knows nothing.",
        "",
        *retention_table(report),
        "",
        "## Findings (computed from the numbers above)",
        "",
        *findings(report),
        "",
    ]
    if problems:
        lines += ["> **Warning: this run no longer supports the conclusion below:**", ""]
        lines += [f"> - {p}" for p in problems] + [""]
    lines += [
        "## Conclusion",
        "",
        conclusion,
        "",
        "## How the numbers were made",
        "",
        "Training (PEFT LoRA r=8, alpha 16 on q_proj, v_proj, up_proj, down_proj; AdamW; loss on the"
        " completion only; `training.json` next to each adapter):",
        "",
        *training_table(),
        "",
        f"The full fine-tune (`scripts/skills/finetune.py`): every attention and MLP projection of layers"
        f" {ft['settings']['layers'][0]}-{ft['settings']['layers'][-1]} ({ft['trained_parameters'] / 1e6:.1f}M"
        f" parameters), {ft['settings']['steps']} steps × {ft['settings']['batch_size']} at lr"
        f" {ft['settings']['lr']}, {ft['seconds']:.0f} s; written to `~/.cache/loracook/finetunes/` (540 MB, not"
        " committed) and rebuilt by the study when missing.",
        "",
        "This run:",
        "",
        "| step | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.1f} |" for k, v in timings.items()),
        "",
        "Evaluation loads the base once and attaches each adapter in memory (`loracook.evaluation`); the full"
        " fine-tune is evaluated by swapping its changed tensors into the base. Every score is in"
        " `recipes/skills/study_results.json`. Machine: "
        f"{os.cpu_count()} CPU cores, no GPU; timings depend on what else runs on the machine.",
        "",
    ]
    DOC.write_text("\n".join(lines))


def print_table(report) -> None:
    width = max(len(r.name) for r in ROWS)
    print("\n" + " " * width + "  " + "  ".join(f"{TASKS[t][0]:>17s}" for t in TASKS))
    for row in ROWS:
        cells = [fmt(get(report, t, row.name), 2) for t in TASKS]
        print(f"{row.name:{width}s}  " + "  ".join(f"{c:>17s}" for c in cells))


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep merged outputs already in out/skills/")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-doc", action="store_true", help="print the table, leave docs/ alone")
    args = parser.parse_args()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    check_inputs()

    import finetune as finetune_script

    t0 = time.perf_counter()
    built = finetune_script.is_built()
    finetune = finetune_script.ensure()
    timings["full fine-tune" + (" (cached)" if built else " (built)")] = time.perf_counter() - t0

    outputs: dict[str, Path] = {}
    for row in ROWS:
        if row.recipe:
            outputs[row.name], seconds = run_recipe(row.recipe, args.reuse)
            timings[f"loracook run {row.recipe}.yaml"] = seconds
            log(f"loracook run {row.recipe}.yaml -> {outputs[row.name].relative_to(ROOT)} ({seconds:.1f} s)")
    log("evaluating…")
    t0 = time.perf_counter()
    reports, seconds = evaluate(ROWS, outputs, finetune, args.batch_size)
    timings["evaluation (all rows)"] = time.perf_counter() - t0
    report = combine(reports)
    report.save(RESULTS)
    problems = check_claims(report)
    timings["total"] = time.perf_counter() - started
    if not args.no_doc:
        chart(report, CHART)
        write_doc(report, timings, finetune, problems)
        log(f"wrote {DOC.relative_to(ROOT)}, {CHART.relative_to(ROOT)}, {RESULTS.relative_to(ROOT)}")
    print_table(report)
    for problem in problems:
        log(f"warning: {problem}")
    log(f"study done in {timings['total']:.0f} s; merged adapters in {OUT.relative_to(ROOT)}/")


if __name__ == "__main__":
    main()
