"""search.png: the objective against the trial number with the best so far; the Pareto front (first two
objectives) when there are several. Drawn through :func:`loracook.plots.new_figure`."""

from __future__ import annotations

from pathlib import Path

from loracook.plots import new_figure, save
from loracook.search.results import (
    RULE_LABELS,
    Record,
    best_so_far,
    natural,
    reference_for,
    selection_score,
)


def plot_search(
    path: Path,
    done: list[Record],
    names: tuple[str, ...],
    signs: tuple[float, ...],
    rule: str,
    chosen: int,
) -> Path:
    several = len(names) > 1
    fig = new_figure(figsize=(11.5 if several else 6.5, 4.4))
    axes = fig.subplots(1, 2 if several else 1, squeeze=False)[0]
    ax = axes[0]
    numbers = [r.number for r in done]
    reference = reference_for(done, signs, rule)
    scores = [natural(selection_score(r, signs, rule, reference), signs, rule) for r in done]
    lower = rule != "improve" and all(s < 0 for s in signs)
    label = names[0] if not several else RULE_LABELS[rule]
    ax.scatter(numbers, scores, s=14, color="tab:blue", label="trial")
    steps = best_so_far(done, signs, rule)
    ax.step(
        [n for n, _ in steps], [v for _, v in steps], where="post", color="tab:orange", label="best so far"
    )
    if several and rule == "improve":
        ax.axhline(0.0, color="gray", lw=0.8, ls="--", label="the starting points")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{label} + L1 term ({'lower' if lower else 'higher'} is better)")
    ax.set_title("search progress")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if several:
        _pareto(axes[1], done, names, signs, chosen)
    fig.tight_layout()
    return save(fig, path)


def _pareto(ax, done: list[Record], names, signs, chosen: int) -> None:
    xs = [r.values[0] for r in done]
    ys = [r.values[1] for r in done]
    pair = signs[:2]  # the front of the two objectives shown
    front = [
        r
        for r in done
        if not any(_dominates(o.values[:2], r.values[:2], pair) for o in done if o.number != r.number)
    ]
    ax.scatter(xs, ys, s=14, color="lightgray", label="trials")
    front.sort(key=lambda r: r.values[0])
    ax.plot([r.values[0] for r in front], [r.values[1] for r in front], "o-", color="tab:red", ms=4,
            label="Pareto front")  # fmt: skip
    best = next((r for r in done if r.number == chosen), None)
    if best is not None:
        ax.scatter([best.values[0]], [best.values[1]], s=90, marker="*", color="tab:orange", zorder=5,
                   label=f"written (trial {chosen})")  # fmt: skip
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.set_title("objectives (with the L1 term)" + (f", first two of {len(names)}" if len(names) > 2 else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def _dominates(a, b, signs) -> bool:
    better = [s * x >= s * y for s, x, y in zip(signs, a, b, strict=False)]
    strictly = [s * x > s * y for s, x, y in zip(signs, a, b, strict=False)]
    return all(better) and any(strictly)
