"""The commands that work on folders that exist (eval, inspect, generate, route); nothing imports torch until
a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from loracook import cli_output
from loracook.cli_commands import EXIT_OK, _check_device, _quiet_lm_eval
from loracook.errors import BadInput


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
