"""Pictures of results: the one door to matplotlib (imported lazily: `pip install 'loracook[plot]'`).

Every chart loracook draws (inspection, evaluation, search, routing) starts from :func:`new_figure`: an Agg
figure that needs no display and no pyplot state, with one install hint when matplotlib is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracook.errors import BadInput

PLOT_HINT = "pip install 'loracook[plot]'"


def new_figure(**kwargs: Any):
    """A matplotlib Figure on the Agg canvas (``figsize``, ``dpi``, ``layout`` as for Figure)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise BadInput("plotting needs matplotlib", fix=PLOT_HINT) from None
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def save(figure, path: Path, dpi: int = 130) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def plot_inspection(path: Path, summaries: list, similarity=None) -> Path:
    """Similarity heatmaps (cosine and subspace φ) when there are several adapters, and the spectra."""
    panels = 3 if similarity is not None else 1
    fig = new_figure(figsize=(5.2 * panels + 0.6, 4.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if similarity is not None:
        for ax, values, title, vmin in (
            (axes[0], similarity.cosine, "cosine similarity of ΔW", -1.0),
            (axes[1], similarity.subspace, "subspace similarity φ (mean)", 0.0),
        ):
            n = len(similarity.names)
            image = ax.imshow(values, vmin=vmin, vmax=1.0, cmap="RdBu_r" if vmin < 0 else "viridis")
            ax.set_xticks(range(n), similarity.names, rotation=30, ha="right")
            ax.set_yticks(range(n), similarity.names)
            for i in range(n):
                for j in range(n):
                    value = values[i][j]
                    color = (
                        "white" if (vmin == 0 and value < 0.6) or (vmin < 0 and abs(value) > 0.6) else "black"
                    )
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", color=color, fontsize=10)
            ax.set_title(title)
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax = axes[-1]
    for summary in summaries:
        spectra = [m.spectrum for m in summary.modules if m.spectrum]
        length = max((len(s) for s in spectra), default=0)
        if not length:
            continue
        # mean normalised spectrum over modules: σ_k / σ_1, so modules of different scale are comparable
        mean = [
            sum(s[k] / s[0] for s in spectra if len(s) > k and s[0] > 0)
            / max(1, sum(1 for s in spectra if len(s) > k))
            for k in range(length)
        ]
        ax.plot(range(1, length + 1), mean, marker="o", markersize=3, label=Path(summary.path).name)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index k")
    ax.set_ylabel("σ_k / σ_1 (mean over modules)")
    ax.set_title("singular spectra of ΔW")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save(fig, path)
