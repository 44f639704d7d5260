"""What linear weights can do for the three skills at best: the front of mean vs worst retention, on the dev split.

The weight search (recipes/skills/search-tasks*.yaml, docs/search.md) chooses on the dev split of each skill's
task (recipes/skills/search_tasks/, drawn like the test items; dev scores track held-out ones within noise).
This scores a grid of linear weights on that same dev split, with the exact LoRA mixture, next to every trial
of the searches (read from their trials.jsonl, scored there on the same items), and draws the upper-right
front of (mean retention, worst retention): a point that beats uniform 0.5 on the mean and uniform 1.0 on the
worst skill must lie beyond both. Retention = the dev score ÷ the skill's own adapter's dev score.

    python scripts/skills/search_front.py [--reuse] [--search out/skills/search-tasks ...]

Writes recipes/skills/search_front.json and docs/search_front.png; prints the front as a table.
Dev items only: nothing here reads a test item.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import NAMES, ROOT, SKILLS, score_candidates, split_reusable  # noqa: E402 - also sets the env

TASKS = {"loracook_kessary_dev": "kessary", "loracook_json_dev": "json", "loracook_headline_dev": "headline"}
GRID = {"kessary": (0.4, 0.55, 0.7, 0.85, 1.0), "json": (0.5, 0.7, 0.9), "headline": (0.5, 0.8)}
OUT = SKILLS / "search_front.json"
PICTURE = ROOT / "docs" / "search_front.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep the scores already in search_front.json")
    parser.add_argument(
        "--search", type=Path, action="append", default=[], help="a search output whose trials to plot"
    )
    args = parser.parse_args()
    saved = json.loads(OUT.read_text()) if args.reuse and OUT.is_file() else {}
    grid = {f"{n} alone": {m: float(m == n) for m in NAMES} for n in NAMES}
    grid["uniform 1.0"] = {n: 1.0 for n in NAMES}
    grid["uniform 0.5"] = {n: 0.5 for n in NAMES}
    for values in itertools.product(*(GRID[n] for n in NAMES)):
        grid["grid " + "/".join(f"{v:g}" for v in values)] = dict(zip(NAMES, values, strict=True))
    scores = _score(grid, saved)
    own = {n: scores[f"{n} alone"][n] for n in NAMES}
    points = {label: _retention(s, own) for label, s in scores.items() if "alone" not in label}
    trials = {}
    for folder in args.search or [ROOT / "out" / "skills" / "search-tasks"]:
        for row in map(json.loads, (folder / "search" / "trials.jsonl").read_text().splitlines()):
            if row["state"] == "COMPLETE":
                by_skill = {TASKS[k]: v for k, v in row["objectives"].items()}
                trials[f"{folder.name} trial {row['number']}"] = _retention(by_skill, own)
    OUT.write_text(
        json.dumps({"weights": grid, "scores": scores, "own": own, "trials": trials}, indent=2) + "\n"
    )
    _print_front(points, trials)
    _plot(points, trials)
    print(f"wrote {OUT} and {PICTURE}")


def _score(grid: dict, saved: dict) -> dict:
    """{label: {skill: dev score}}: saved scores of unchanged grid points, the rest scored now."""
    kept, todo = split_reusable(grid, saved)
    scored = score_candidates("search_tasks", TASKS, todo)
    return {label: kept.get(label) or {s: v for s, (v, _) in scored[label].items()} for label in grid}


def _retention(by_skill: dict, own: dict) -> dict:
    ret = {n: by_skill[n] / own[n] for n in NAMES}
    return {**ret, "mean": sum(ret.values()) / len(ret), "worst": min(ret.values())}


def _front(points: dict) -> list[tuple[str, dict]]:
    """The points no other point beats on both mean and worst retention, by worst retention."""
    items = list(points.items())
    return sorted(
        (
            (label, p)
            for label, p in items
            if not any(
                q["mean"] >= p["mean"]
                and q["worst"] >= p["worst"]
                and (q["mean"], q["worst"]) != (p["mean"], p["worst"])
                for _, q in items
            )
        ),
        key=lambda item: item[1]["worst"],
    )


def _print_front(points: dict, trials: dict) -> None:
    everything = {**points, **trials}
    lines = [
        "| point on the front (dev) | kessary | json | headline | mean | worst |",
        "|---|---|---|---|---|---|",
    ]
    for label, p in _front(everything):
        lines.append(f"| {label} | " + " | ".join(f"{p[k]:.2f}" for k in (*NAMES, "mean", "worst")) + " |")
    for label in ("uniform 1.0", "uniform 0.5"):
        p = points[label]
        lines.append(f"| ({label}) | " + " | ".join(f"{p[k]:.2f}" for k in (*NAMES, "mean", "worst")) + " |")
    both = [
        label
        for label, p in everything.items()
        if p["mean"] > points["uniform 0.5"]["mean"] and p["worst"] > points["uniform 1.0"]["worst"]
        and p["worst"] > points["uniform 0.5"]["worst"]
    ]  # fmt: skip
    print("\n".join(lines))
    print(
        f"\npoints above uniform 0.5 on the mean and above both uniform settings at worst: {both or 'none'}"
    )


def _plot(points: dict, trials: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    grid = [p for label, p in points.items() if label.startswith("grid")]
    ax.scatter([p["mean"] for p in grid], [p["worst"] for p in grid], s=18, c="#999999", label="linear grid")
    ax.scatter([p["mean"] for p in trials.values()], [p["worst"] for p in trials.values()], s=14, c="#4c72b0",
               alpha=0.6, label="search trials")  # fmt: skip
    front = _front({**points, **trials})
    ax.plot([p["mean"] for _, p in front], [p["worst"] for _, p in front], c="#c44e52", lw=1, label="front")
    for label, marker in (("uniform 1.0", "s"), ("uniform 0.5", "D")):
        p = points[label]
        ax.scatter([p["mean"]], [p["worst"]], marker=marker, s=60, c="black", zorder=3)
        ax.annotate(label, (p["mean"], p["worst"]), textcoords="offset points", xytext=(6, -10), fontsize=8)
    ax.set_xlabel("mean retention (dev split)")
    ax.set_ylabel("worst retention (dev split)")
    ax.set_title("Linear weights of three skill LoRAs: mean vs worst skill")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(PICTURE, dpi=120)


if __name__ == "__main__":
    main()
