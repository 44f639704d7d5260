"""The command line: argument parsing, rich output and progress. No math here; the engine is imported lazily
so that `loracook --help` and `loracook validate` never import torch."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loracook import __version__, cli_output
from loracook.errors import BadInput

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}; see `{self.prog} --help`", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)


def _positive_number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="loracook",
        description="Declarative YAML recipes for merging, extracting and evaluating LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"loracook {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="validate, plan and execute a recipe")
    run.add_argument("recipe", type=Path)
    run.add_argument("--output", "-o", type=Path, help="output folder (overrides output.path)")
    run.add_argument("--force", action="store_true", help="replace an existing output")
    run.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="device for evaluation and the search's forward passes (default cpu); the merge math streams on "
        "the CPU",
    )
    run.add_argument("--no-eval", action="store_true", help="skip the evaluate section")
    run.add_argument("--seed", type=int, help="override merge.seed")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    run.add_argument("--resume", action="store_true", help="continue a stopped search (the recipe's search:)")

    validate = sub.add_parser("validate", help="check recipes (schema and semantics, file headers only)")
    validate.add_argument("recipes", type=Path, nargs="+")
    validate.add_argument("--schema-only", action="store_true", help="do not open the files the recipe names")
    validate.add_argument(
        "--format",
        choices=["text", "github"],
        default="text",
        help="github: `::error file=…,line=…,col=…::` lines that GitHub Actions shows on the recipe's line",
    )

    init = sub.add_parser("init", help="write a commented recipe that merges these adapters")
    init.add_argument("adapters", type=Path, nargs="+", help="PEFT adapter folders")
    init.add_argument("--base", help="base model (default: the adapters' base_model_name_or_path)")
    init.add_argument("--method", default="linear", help="merge method (default linear)")
    init.add_argument("-o", "--output", type=Path, help="recipe file to write (default: print it)")
    init.add_argument("--force", action="store_true", help="replace an existing recipe file")

    plan = sub.add_parser("plan", help="dry run: the task table, bytes to read and write, peak memory")
    plan.add_argument("recipe", type=Path)
    plan.add_argument("--output", "-o", type=Path)
    plan.add_argument("--all", action="store_true", help="list every tensor, not only the changed ones")

    schema = sub.add_parser("schema", help="write schemas/recipe.schema.json, or check that it is current")
    schema.add_argument("--check", action="store_true")
    schema.add_argument("--path", type=Path, default=Path("schemas/recipe.schema.json"))

    inspect = sub.add_parser("inspect", help="summarise adapters or models, and how similar adapters are")
    inspect.add_argument("paths", type=Path, nargs="+")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.add_argument("--plot", type=Path, metavar="FILE.png", help="similarity heatmaps and spectra")
    inspect.add_argument("--modules", action="store_true", help="list every module of each adapter")

    evaluate = sub.add_parser(
        "eval", help="run lm-eval on an existing output (a model folder, or an adapter)"
    )
    evaluate.add_argument("model", type=Path, help="a model folder or a PEFT adapter folder")
    evaluate.add_argument("--tasks", nargs="+", required=True, help="task names, task YAML files or folders")
    evaluate.add_argument(
        "--base", type=Path, help="base model folder for an adapter (default: its config's)"
    )
    evaluate.add_argument(
        "--limit", type=_positive_number, help="examples per task (a number, or a share below 1)"
    )
    evaluate.add_argument("--num-fewshot", type=int)
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    evaluate.add_argument("--apply-chat-template", action="store_true")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--report-dir", type=Path, help="where eval_results.json/.png go (default: MODEL)")
    _add_search_worker(sub)
    _add_routing_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {
        "run": _cmd_run,
        "validate": _cmd_validate,
        "init": _cmd_init,
        "plan": _cmd_plan,
        "schema": _cmd_schema,
        "inspect": _cmd_inspect,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "route": _cmd_route,
        "search-worker": _cmd_search_worker,
    }[args.command]
    from loracook.io.signals import Terminated, handling_signals

    with handling_signals():  # SIGTERM/SIGHUP unwind like Ctrl-C; a write past `ulimit -f` fails with EFBIG
        try:
            return handler(args)
        except BadInput as error:
            _print_error(error)
            return EXIT_BAD_INPUT
        except (KeyboardInterrupt, Terminated) as stop:
            return _stopped(stop)
        except OSError as error:
            return _environment_error(error)


def _stopped(stop: BaseException) -> int:
    """Ctrl-C (130) or SIGTERM/SIGHUP (128 + signal): the ``with`` blocks have removed their temporary folders
    while unwinding; the registered cleanups catch anything a second signal interrupted. One line, no traceback."""
    from loracook.io.signals import Terminated, run_cleanups

    run_cleanups()
    if isinstance(stop, Terminated):
        print(f"loracook: stopped by {stop.name}; its temporary files were removed", file=sys.stderr)
        return stop.exit_code
    print("loracook: interrupted", file=sys.stderr)
    return 130


def _environment_error(error: OSError) -> int:
    """Permissions, a full disk, the file-size limit, a read-only disk, a vanished path: one line with the
    path and the fix (exit 2). Any other OSError is a bug and keeps its traceback."""
    from loracook.errors import os_error_line
    from loracook.io.signals import run_cleanups

    line = os_error_line(error)
    if line is None:
        raise error
    run_cleanups()
    print(f"error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT


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


def _cmd_eval(args: argparse.Namespace) -> int:
    from loracook.evaluation import EvalOptions, evaluate_candidates, path_candidate, resolve_tasks

    _quiet_lm_eval()
    _check_device(args.device)
    if not args.model.exists():
        raise BadInput("no such model or adapter folder", file=args.model)
    candidate = path_candidate(args.model, base=args.base)  # a bad folder fails before lm-eval loads tasks
    tasks = resolve_tasks(args.tasks, Path.cwd(), loc=("tasks",))
    options = EvalOptions(
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        device=args.device,
        apply_chat_template=args.apply_chat_template,
        seed=args.seed,
        quiet=True,
    )
    console = cli_output.make_console()
    report = evaluate_candidates([candidate], tasks, options, on_event=cli_output.eval_printer(console))
    folder = args.report_dir or (args.model if args.model.is_dir() else Path.cwd())
    folder.mkdir(parents=True, exist_ok=True)
    report.save(folder / "eval_results.json")
    try:
        report.plot(folder / "eval_results.png")
    except BadInput as error:
        console.print(f"no chart: {error.one_line()}")
    cli_output.print_eval(report, folder)
    return EXIT_OK


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


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from loracook import inspection

    for path in args.paths:
        if not path.exists():
            raise BadInput("no such file or folder", file=path, fix="give adapter or model folders")
    adapters = [p for p in args.paths if inspection.is_adapter(p)]
    models = [p for p in args.paths if not inspection.is_adapter(p)]
    summaries, similarity = inspection.inspect_adapters(adapters) if adapters else ([], None)
    model_summaries = [inspection.summarize_model(p) for p in models]
    if args.plot:
        if not summaries:
            raise BadInput("--plot needs at least one adapter", file=args.plot)
        from loracook.plots import plot_inspection

        plot_inspection(args.plot, summaries, similarity)
    if args.json:
        payload = {
            "adapters": [s.to_json() for s in summaries],
            "models": [m.to_json() for m in model_summaries],
            "similarity": similarity.to_json() if similarity else None,
        }
        print(json.dumps(payload, indent=2))
        return EXIT_OK
    cli_output.print_inspection(summaries, model_summaries, similarity, args.modules)
    if args.plot:
        cli_output.make_console().print(f"[green]wrote[/green] {args.plot}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- rendering


# ------------------------------------------------------------------------------------------------ search


def _add_search_worker(sub) -> None:
    worker = sub.add_parser(
        "search-worker", help="join a running search (the recipe's study storage) as one more worker"
    )
    worker.add_argument("recipe", type=Path)
    worker.add_argument("--output", "-o", type=Path, help="the output folder of the search's run")
    worker.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    worker.add_argument("--seed", type=int, help="override merge.seed (as the run did)")
    worker.add_argument("--quiet", "-q", action="store_true", help="no progress bar")


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
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]searching"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.description}"),
                console=self.console,
                transient=True,
            )
            self.bar.start()
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


# ----------------------------------------------------------------------------------------------- routing


def _add_routing_parsers(sub) -> None:
    """`generate` and `route` (docs/routing.md)."""
    generate = sub.add_parser("generate", help="generate text with a router (each prompt routed) or a model")
    generate.add_argument("model", type=Path, help="a router folder, a model folder or a PEFT adapter folder")
    generate.add_argument("prompt", nargs="?", help="the prompt (or --file)")
    generate.add_argument("--file", type=Path, help='JSONL of {"prompt": ...} lines: completions as JSONL')
    generate.add_argument(
        "--explain", action="store_true", help="show the weight the router gives each source"
    )
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--batch-size", type=int, default=8)
    generate.add_argument("--base", type=Path, help="base model folder (default: the one the folder names)")
    generate.add_argument("--device", default="cpu")
    route = sub.add_parser("route", help="route prompts: JSONL of each source's weight and the top-1 adapter")
    route.add_argument("router", type=Path, help="a router folder")
    route.add_argument("--file", type=Path, required=True, help='JSONL of {"prompt": ...} lines')
    route.add_argument("--output", "-o", type=Path, help="write the JSONL here instead of stdout")
    route.add_argument("--batch-size", type=int, default=16)
    route.add_argument("--base", type=Path, help="base model folder (default: the one router.json names)")
    route.add_argument("--device", default="cpu")


def _cmd_generate(args: argparse.Namespace) -> int:
    import json

    from loracook.routing.commands import generate

    if (args.prompt is None) == (args.file is None):
        raise BadInput("give a prompt or --file (one of the two)", fix='loracook generate PATH "prompt"')
    results = generate(
        args.model,
        [args.prompt] if args.file is None else None,
        file=args.file,
        explain=args.explain,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        base=args.base,
        device=args.device,
    )
    if args.file is not None:
        for row in results:
            print(json.dumps(row, ensure_ascii=False), flush=True)
        return EXIT_OK
    row = results[0]
    if args.explain:
        weights = ", ".join(f"{name} {w:.3f}" for name, w in row["weights"].items())
        print(f"routing: {weights} (top-1: {row['top']})")
    print(row["completion"])
    return EXIT_OK


def _cmd_route(args: argparse.Namespace) -> int:
    from loracook.routing.commands import route

    lines = route(args.router, args.file, batch_size=args.batch_size, base=args.base, device=args.device)
    if args.output is None:
        for line in lines:
            print(line, flush=True)
        return EXIT_OK
    try:
        args.output.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    except OSError as exc:
        raise BadInput(f"cannot write the routes: {exc.strerror or exc}", file=args.output) from None
    cli_output.make_console().print(f"[green]wrote[/green] {args.output} ({len(lines)} prompts)")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
