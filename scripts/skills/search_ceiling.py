"""How far any per-source linear weights can go on the held-out test items: a diagnostic, never a search result.

The quality bar of the weight search (docs/search.md) is measured on the test items: the searched weights
should beat uniform 1.0 and 0.5 in mean retention and in the worst skill. This scores a grid of per-source
linear weights on those same test items (the exact LoRA mixture, lm-eval) and reports the best mean retention
among the points whose worst skill beats both uniform settings. Because the grid is chosen *on the test*, its
best point is an upper bound with a winner's bias, not something a search could honestly report: it says how
much room the bar leaves above uniform 0.5, measured against the stderr.

The grid starts at a Kessary weight of 0.65: at 0.5 the facts stay at uniform 0.5's level whatever the other
weights (0.5 / 0.4-0.6 / 0.4-0.8 scored 0.344-0.370 on the facts, retention 0.42-0.45), so no such point can
beat uniform 0.5 on the worst skill.

    python scripts/skills/search_ceiling.py [--reuse]

Writes recipes/skills/search_ceiling.json (saved after every few points, so a stopped run keeps its scores)
and prints the points by mean retention. Own-adapter and uniform scores come from search_quality.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import NAMES, SKILLS, TASKS, retention, score_candidates, split_reusable  # noqa: E402

GRID = {"kessary": (0.65, 0.8), "json": (0.4, 0.6, 0.8), "headline": (0.4, 0.6, 0.8)}
OUT = SKILLS / "search_ceiling.json"
CHUNK = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reuse", action="store_true", help="keep the scores already in search_ceiling.json")
    args = parser.parse_args()
    quality = json.loads((SKILLS / "search_quality.json").read_text())
    own = {n: quality["scores"][f"{n} alone"][n] for n in NAMES}
    grid = {
        "grid " + "/".join(f"{v:g}" for v in values): dict(zip(NAMES, values, strict=True))
        for values in itertools.product(*(GRID[n] for n in NAMES))
    }
    saved = json.loads(OUT.read_text()) if args.reuse and OUT.is_file() else {}
    scores, todo = split_reusable(grid, saved)
    labels = list(todo)
    for start in range(0, len(labels), CHUNK):
        chunk = {label: todo[label] for label in labels[start : start + CHUNK]}
        scores.update(score_candidates("tasks", TASKS, chunk))
        OUT.write_text(json.dumps({"weights": grid, "scores": scores}, indent=2) + "\n")
    for label in ("linear 1.0", "linear 0.5"):
        scores[label] = quality["scores"][label]
    rows = {label: retention(s, own) for label, s in scores.items()}
    bar = max(min(rows[label][0])[0] for label in ("linear 1.0", "linear 0.5"))
    print("| weights (kessary/json/headline) | mean retention | worst retention | worst beats both uniform |")
    print("|---|---|---|---|")
    for label, (ret, mean, mean_err) in sorted(rows.items(), key=lambda item: -item[1][1]):
        worst = min(ret)
        beats = "yes" if worst[0] > bar else ""
        print(
            f"| {label} | {mean:.3f} ± {mean_err:.3f} | {worst[0]:.3f} ± {worst[1]:.3f} ({worst[2]}) | {beats} |"
        )
    OUT.write_text(json.dumps({"weights": grid, "scores": scores, "own": own}, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
