"""What the CLI shows: rich tables (plan, inspection, extraction, evaluation) and the progress bar.

The engine reports through callbacks and returns data; this module turns them into terminal output. No math.
"""

from __future__ import annotations

from pathlib import Path


def make_console():
    from rich.console import Console

    return Console(stderr=False, highlight=False, soft_wrap=True)


def eval_printer(console):
    def on_event(event) -> None:
        if event.kind == "start":
            console.print(f"evaluating {event.candidate} ({event.index + 1}/{event.total})…")
        elif event.seconds is not None:
            console.print(f"  {event.candidate} done in {event.seconds:.1f} s")

    return on_event


def print_eval(report, folder: Path | None) -> None:
    from rich.table import Table

    console = make_console()
    header, rows = report.table()
    table = Table(title="evaluation (lm-eval, ± stderr)")
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if folder is not None:
        png = folder / "eval_results.png"
        console.print(
            f"results: {folder / 'eval_results.json'}" + (f", chart: {png}" if png.is_file() else "")
        )


def print_extraction(report) -> None:
    from rich.table import Table

    console = make_console()
    summary = report.to_json()
    loras = [m for m in report.modules if m.kind in ("lora", "embedding-lora")]
    table = Table(title=f"extraction {report.source}: {len(loras)} LoRA modules (worst first)")
    for column in ("tensor", "kind", "rank", "energy kept", "relative error", "‖ΔW‖/‖W‖", "svd"):
        table.add_column(column, justify="left" if column in ("tensor", "kind", "svd") else "right")
    worst = sorted(report.modules, key=lambda m: -m.relative_error)
    shown = [m for m in worst if m.kind != "unchanged"][:15]
    for m in shown:
        table.add_row(
            m.name,
            m.kind,
            str(m.rank),
            f"{m.energy:.4f}",
            f"{m.relative_error:.3e}",
            f"{m.change:.2e}",
            m.method,
        )
    console.print(table)
    counts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items())
    console.print(
        f"{counts}; max relative error {summary['max_relative_error']:.3e}, mean energy kept "
        f"{summary['mean_energy']:.4f}; every module in extract_report.json"
    )


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def print_plan(plan, values, target: Path, show_all: bool) -> None:
    from rich.table import Table

    from loracook.plan.tasks import ModuleTask

    console = make_console()
    table = Table(title=f"plan: {plan.kind} by {plan.method} -> {target}")
    adapter = plan.parallel  # small tasks kept whole (adapter modules), not streamed tensors
    columns = (
        ("module", "shape", "terms", "rank out", "how")
        if adapter
        else ("tensor", "shape", "dtype", "terms", "rows/block")
    )
    for column in columns:
        table.add_column(
            column, justify="left" if column in ("tensor", "module", "terms", "how") else "right"
        )
    for task in plan.tasks:
        if not task.terms and not show_all:
            continue
        terms = ", ".join(term_label(t, values) for t in task.terms) or "copy"
        if isinstance(task, ModuleTask):
            how = "exact" if task.exact else ("factored svd" if task.factored else "dense + randomized svd")
            shape = f"{task.out_features}×{task.in_features}"
            table.add_row(task.module, shape, terms, str(task.rank), how)
        elif adapter:
            table.add_row(task.name, "×".join(map(str, task.shape)), terms, "-", "saved in full")
        else:
            dtype = str(task.dtype).removeprefix("torch.")
            shape = "×".join(map(str, task.shape))
            rows = str(task.block_rows) if task.streamed else f"{task.block_rows} (whole)"
            table.add_row(task.name, shape, dtype, terms, rows)
    console.print(table)
    for note in plan.notes:
        console.print(note)
    if plan.virtual:
        console.print(
            "extract sources are shown at their maximum rank; the extraction decides the real ranks"
        )
    changed = sum(1 for t in plan.tasks if t.terms)
    noun = "modules" if adapter else "tensors"
    console.print(
        f"{len(plan.tasks)} {noun} ({changed} changed{'' if show_all or adapter else ', --all lists the rest'}); "
        f"read {human_size(plan.bytes_read)}, write {human_size(plan.bytes_written)}"
        f"{' (the adapter)' if adapter else ''}; peak working memory ≈ {human_size(plan.peak_memory)} beyond the interpreter"
    )


def term_label(term, values) -> str:
    from loracook.plan.tasks import BiasTerm, FullTerm, LoraTerm

    weight = values.weight(term.source, term.at)
    if isinstance(term, LoraTerm):
        kind = "dora" if term.magnitude is not None else "lora"
        text = f"{term.source}:{kind} r{term.a.shape[0]} ×{weight:g}"
    elif isinstance(term, FullTerm):
        text = f"{term.source}:replace ×{weight:g}"
    elif isinstance(term, BiasTerm):
        text = f"{term.source}:bias ×{weight:g}"
    else:
        text = str(term)
    return text + (" +dare" if getattr(term, "dare", None) else "")


def print_inspection(summaries, models, similarity, all_modules: bool) -> None:
    from rich.table import Table

    console = make_console()
    for model in models:
        table = Table(title=f"model {model.path}", show_header=False)
        table.add_row("architecture", model.architecture)
        table.add_row("parameters", f"{model.parameters / 1e6:,.1f} M in {model.layers} layers")
        table.add_row("dtypes", ", ".join(f"{k}: {v / 1e6:,.1f} M" for k, v in model.dtypes.items()))
        table.add_row("shards", ", ".join(f"{name} ({human_size(size)})" for name, size in model.shards))
        console.print(table)
    for summary in summaries:
        modules = summary.modules
        table = Table(title=f"adapter {summary.path}: {len(modules)} modules, ‖ΔW‖_F = {summary.norm:.4g}")
        for column in ("module", "shape", "rank", "alpha", "scale", "‖ΔW‖_F", "r@90%", "r@99%", "top σ"):
            table.add_column(column, justify="left" if column == "module" else "right")
        shown = modules if all_modules or len(modules) <= 24 else modules[:12] + modules[-12:]
        for m in shown:
            top = ", ".join(f"{x:.3g}" for x in m.spectrum[:3])
            table.add_row(
                m.module,
                f"{m.shape[0]}×{m.shape[1]}",
                str(m.rank),
                f"{m.alpha:g}",
                f"{m.scale:.3g}",
                f"{m.norm:.4g}",
                str(m.rank90),
                str(m.rank99),
                top,
            )
        console.print(table)
        if summary.serving is not None:
            from loracook.serving import summary_lines

            console.print(
                "serving: " + "; ".join(line.strip("- ") for line in summary_lines(summary.serving))
            )
        if len(shown) < len(modules):
            console.print(
                f"({len(modules) - len(shown)} modules not shown; --modules lists all, --json gives everything)"
            )
    if similarity is not None:
        for title, values in (
            ("cosine similarity of ΔW (all shared modules)", similarity.cosine),
            ("subspace similarity φ (mean over modules)", similarity.subspace),
        ):
            table = Table(title=f"{title}, {similarity.shared_modules} shared modules")
            table.add_column("")
            for name in similarity.names:
                table.add_column(name, justify="right")
            for name, row in zip(similarity.names, values, strict=True):
                table.add_row(name, *(f"{v:+.3f}" for v in row))
            console.print(table)


def progress_bar(console, title: str):
    """The CLI's one progress-bar layout (merging, searching): started, transient, with done/total and ETA."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(
        TextColumn(f"[bold]{title}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )
    bar.start()
    return bar


class Progress:
    """A rich progress bar fed by the engine's on_task callback."""

    def __init__(self, console, quiet: bool) -> None:
        self.console, self.quiet = console, quiet

    def __enter__(self):
        if self.quiet:
            return None
        self.bar = progress_bar(self.console, "merging")
        self.task = self.bar.add_task("", total=None)

        def on_task(done: int, total: int, label: str) -> None:
            self.bar.update(self.task, completed=done, total=total, description=label)

        return on_task

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self.bar.stop()
