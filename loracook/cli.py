"""The command line: argument parsing, rich output and progress. No math here; the engine is imported lazily
so that `loracook --help` and `loracook validate` never import torch.

The commands live in ``cli_commands`` (those that take a recipe) and ``cli_folders`` (those on existing folders),
the rendering in ``cli_output``."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from loracook import __version__
from loracook.cli_commands import (
    EXIT_BAD_INPUT,
    EXIT_INTERNAL,
    EXIT_OK,
    _cmd_init,
    _cmd_plan,
    _cmd_run,
    _cmd_schema,
    _cmd_search_worker,
    _cmd_validate,
    _print_error,
)
from loracook.cli_folders import _cmd_eval, _cmd_generate, _cmd_inspect, _cmd_route
from loracook.errors import BadInput

__all__ = ["EXIT_BAD_INPUT", "EXIT_INTERNAL", "EXIT_OK", "build_parser", "main"]


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
    # The CLI shows its own progress (rich); transformers' and the hub's tqdm bars ("Loading weights") would
    # interleave with it. Read when transformers is imported, which is later than this.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
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
    from loracook.io.signals import Terminated, handling_signals, stop_in_flight

    with handling_signals():  # SIGTERM/SIGHUP unwind like Ctrl-C; a write past `ulimit -f` fails with EFBIG
        try:
            return handler(args)
        except (KeyboardInterrupt, Terminated) as stop:
            return _stopped(stop)
        except (BadInput, OSError) as error:
            stop = stop_in_flight()  # a cleanup that failed while a signal unwound it hides the signal
            if stop is not None:
                return _stopped(stop)
            if isinstance(error, BadInput):
                _print_error(error)
                return EXIT_BAD_INPUT
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


if __name__ == "__main__":
    raise SystemExit(main())
