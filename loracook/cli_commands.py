"""The commands that take a recipe (validate, init, plan, run, schema, search-worker) and the helpers every
command shares. No math here: the engine and everything that imports torch are imported inside the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from loracook import cli_output
from loracook.errors import BadInput

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


def _print_error(error: BadInput) -> None:
    print(f"error: {error.one_line()}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ commands


def _check_device(device: str | None) -> None:
    """Refuse a CUDA device where there is none, before any work (instead of failing deep inside)."""
    if device and device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BadInput(
                f"--device {device}: CUDA is not available on this machine", fix="use --device cpu"
            )


def _load(path: Path, seed: int | None = None):
    from loracook.recipe import load_recipe

    return load_recipe(path, seed=seed)


def _cmd_validate(args: argparse.Namespace) -> int:
    console = cli_output.make_console()
    failed = 0
    for path in args.recipes:
        try:
            loaded = _load(path)
            if not args.schema_only:
                _check_files(loaded)
        except BadInput as error:
            if args.format == "github":
                from loracook.annotations import github_line

                print(github_line(error))
            else:
                _print_error(error)
            failed += 1
            continue
        console.print(f"[green]ok[/green] {path}")
    return EXIT_BAD_INPUT if failed else EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    from loracook.scaffold import init_recipe

    text = init_recipe(
        args.adapters, base=args.base, method=args.method, output=args.output, force=args.force
    )
    if args.output is None:
        print(text, end="")
    else:
        cli_output.make_console().print(
            f"[green]wrote[/green] {args.output}; check it with `loracook validate {args.output}`"
        )
    return EXIT_OK


def _check_files(loaded) -> None:
    """Open every file the recipe names (headers only) and check that the sources fit the base."""
    from loracook.engine import prepare

    try:
        prepare(loaded.recipe)
        _check_tasks(loaded)
    except BadInput as error:
        raise loaded.locate(error) from None


def _check_tasks(loaded) -> None:
    """The evaluate section's tasks exist and work offline (task files only; no model is loaded)."""
    if loaded.recipe.evaluate is not None:
        from loracook.evaluation import resolve_tasks

        resolve_tasks(loaded.recipe.evaluate.tasks, Path.cwd(), load=False)


def _cmd_plan(args: argparse.Namespace) -> int:
    from loracook.engine import output_path, prepare
    from loracook.plan.compile import recipe_values

    loaded = _load(args.recipe)
    try:
        prepared = prepare(loaded.recipe)
        _check_tasks(loaded)
        target = output_path(loaded.recipe, args.output)
    except BadInput as error:
        raise loaded.locate(error) from None
    values = recipe_values(loaded.recipe, prepared.base)
    cli_output.print_plan(prepared.plan, values, target, show_all=args.all)
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from loracook import engine

    loaded = _load(args.recipe, args.seed)
    _check_device(args.device)
    console = cli_output.make_console()
    quiet = args.quiet or (not console.is_terminal and os.environ.get("LORACOOK_PROGRESS") != "1")
    if loaded.recipe.evaluate is not None and not args.no_eval:
        _quiet_lm_eval()
    try:
        with cli_output.Progress(console, quiet) as on_task:
            result = engine.run(
                loaded.recipe,
                recipe_text=loaded.text,
                output=args.output,
                force=args.force,
                on_task=on_task,
                evaluate=not args.no_eval,
                device=args.device,
                on_eval=cli_output.eval_printer(console),
                recipe_file=loaded.file,
                resume=args.resume,
                on_search=_search_bar(console, quiet, args.recipe, loaded.recipe.search),
            )
    except BadInput as error:
        raise loaded.locate(error) from None
    for report in result.extractions.values():
        cli_output.print_extraction(report)
    plan = result.plan
    console.print(
        f"[green]wrote[/green] {result.output} ({cli_output.human_size(plan.bytes_written)}, {len(plan.tasks)} tasks)"
    )
    if any(m.method != "exact" for m in result.report.modules):
        summary = result.report.to_json()
        console.print(
            f"recompression: {len(result.report.modules)} modules, relative Frobenius error "
            f"max {summary['max_relative_error']:.2e}, mean {summary['mean_relative_error']:.2e} (merge_report.json)"
        )
    if result.evaluation is not None:
        cli_output.print_eval(result.evaluation, result.output)
    return EXIT_OK


def _quiet_lm_eval() -> None:
    """lm-eval and datasets print progress bars and info logs of their own; the CLI shows its own progress."""
    import logging
    import warnings

    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecations inside lm-eval
    for name in ("lm_eval", "lm-eval", "datasets", "transformers", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cmd_schema(args: argparse.Namespace) -> int:
    from loracook.recipe.schema import schema_is_current, write_schema

    if args.check:
        if schema_is_current(args.path):
            print(f"{args.path} is current")
            return EXIT_OK
        raise BadInput(
            "the JSON schema is stale or missing", file=args.path, fix="run `loracook schema` and commit it"
        )
    changed = write_schema(args.path)
    print(f"{'wrote' if changed else 'unchanged'} {args.path}")
    return EXIT_OK


def _cmd_search_worker(args: argparse.Namespace) -> int:
    from loracook.engine import output_path
    from loracook.search import join_search

    loaded = _load(args.recipe, args.seed)
    console = cli_output.make_console()
    quiet = args.quiet or (not console.is_terminal and os.environ.get("LORACOOK_PROGRESS") != "1")
    try:
        if loaded.recipe.search is None:
            raise BadInput(
                "the recipe has no `search:` section", loc=("search",), fix="add one (docs/search.md)"
            )
        bar = _search_bar(console, quiet, args.recipe, loaded.recipe.search)
        try:
            target = output_path(loaded.recipe, args.output)
            mine = join_search(loaded.recipe, target, device=args.device, on_event=bar)
        finally:
            bar.close()
    except BadInput as error:
        raise loaded.locate(error) from None
    console.print(f"this worker finished {mine} trial(s); the study has its budget")
    return EXIT_OK


class _search_bar:
    """The search's rich bar (trials done, best so far, ETA), fed by the engine's SearchEvent callback."""

    def __init__(self, console, quiet: bool, recipe: Path, search=None) -> None:
        self.console, self.quiet, self.recipe, self.bar = console, quiet, recipe, None
        if search is not None:
            _quiet_lm_eval()  # a tasks objective runs lm-eval once per trial; the bar reports instead

    def __call__(self, event) -> None:
        if event.kind == "stopping":
            self._print("stopping after the running trial (Ctrl-C again to stop at once)…")
        elif event.kind == "stopped":
            self.close()
            self._print(
                f"search stopped after {event.done} of {event.budget} trials (kept in {event.where}); "
                f"resume with: loracook run {self.recipe} --resume"
            )
            return
        if event.kind == "aborted":
            self.close()
            return
        best = "-" if event.best is None else f"{event.best:.4g}"
        if not self.quiet and self.bar is None and event.kind != "done":
            self.bar = cli_output.progress_bar(self.console, "searching")
            self.task = self.bar.add_task("", total=event.budget)
        if self.bar is not None:
            self.bar.update(self.task, completed=event.done, description=f"best {event.label} {best}")
        if event.kind == "done":
            self.close()
            self._print(f"search: {event.done} trials, best {event.label} {best}")

    def _print(self, text: str) -> None:
        print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
