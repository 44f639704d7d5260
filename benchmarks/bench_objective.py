"""Time the examples objective (the inner loop of a weight search) on SmolLM2-135M-Instruct.

Rows of the table, each the best of --repeat interleaved calls over the same length-sorted batches:

- naive: ``model(input_ids, attention_mask, labels)`` per batch, i.e. full-vocabulary logits at every position
  and HF's loss (what LoraHub does), combined token-weighted so its value equals ours;
- objective: ``loracook.objective.ExamplesObjective`` (decoder body, output head only at the positions that
  predict output tokens);
- floor: the bare decoder body over the same batches, no output head at all (no objective can be cheaper);
- objective + mixture: the same with three random rank-8 LoRAs on every projection attached through
  ``loracook.mixture.LoraMixture`` with global coefficients (one search candidate).

    .venv/bin/python benchmarks/bench_objective.py [--examples 72] [--repeat 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time

for _key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = (
    "island harbour lantern keeper tide salt granite ferry market copper orchard beacon archive river "
    "bridge winter festival captain northern eastern council library quarry mill cliff meadow"
).split()


def make_examples(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n question/answer pairs of ~36 SmolLM2 tokens (~24 for the input, ~12 for the output)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        subject = " ".join(rng.choices(WORDS, k=rng.randint(3, 6)))
        question = f"Question: In the Kessary Islands, what is known about the {subject}?\nAnswer:"
        answer = " " + " ".join(rng.choices(WORDS, k=rng.randint(6, 10))).capitalize() + "."
        out.append((question, answer))
    return out


def timed(fn) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, value) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, value


def compare(contenders: dict, repeat: int) -> dict[str, tuple[float, float, float]]:
    """Best (min) wall and CPU seconds per contender over ``repeat`` rounds, after one warm-up round. Rounds
    interleave the contenders, so load from other processes hits them alike, and the minimum is the run
    least disturbed by it; CPU time (one torch thread by default) is nearly immune to such load."""
    best: dict[str, list[float]] = {}
    for round_ in range(repeat + 1):
        for name, fn in contenders.items():
            wall, cpu, value = timed(fn)
            if round_:
                old = best.get(name, [math.inf, math.inf, value])
                best[name] = [min(old[0], wall), min(old[1], cpu), value]
    return {name: tuple(v) for name, v in best.items()}


def naive(model, objective) -> float:
    """Full logits + HF loss per batch over the objective's own batches (same tokens, same padding)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in objective.batches:
            labels = torch.full_like(batch.ids, -100).view(-1)
            # labels[p + 1] is the token predicted at position p (HF shifts labels by one)
            labels[batch.positions + 1] = batch.targets
            labels = labels.view_as(batch.ids)
            mask = (
                (labels != -100).cumsum(1).flip(1).cummax(1).values.flip(1).clamp(max=1)
            )  # up to last target
            loss = model(input_ids=batch.ids, attention_mask=mask, labels=labels).loss
            total += float(loss) * len(batch.targets)
            count += len(batch.targets)
    return total / count


def floor(body, objective) -> float:
    with torch.inference_mode():
        for batch in objective.batches:
            body(input_ids=batch.ids, use_cache=False)
    return float("nan")


def random_sources(model, n: int, rank: int, seed: int = 0):
    from loracook.mixture import LoraFactors

    gen = torch.Generator().manual_seed(seed)
    sources = {}
    for i in range(n):
        factors = {}
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in PROJ:
                out_f, in_f = module.weight.shape
                a = torch.randn(rank, in_f, generator=gen) / in_f**0.5
                b = torch.randn(out_f, rank, generator=gen) * 0.01
                factors[name] = LoraFactors(a, b, 2.0)
        sources[f"lora{i}"] = factors
    return sources


def _smollm2_folder():
    """SmolLM2-135M-Instruct as an fp32 HF folder (the function moved from loracook.models to loracook.io)."""
    try:
        from loracook.io.packaged import smollm2_folder
    except ImportError:
        from loracook.models import smollm2_folder
    return smollm2_folder()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=72)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.mixture import LoraMixture
    from loracook.objective import ExamplesObjective

    folder = _smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    examples = make_examples(args.examples)
    start = time.perf_counter()
    objective = ExamplesObjective(model, tok, examples, batch_tokens=args.batch_tokens)
    setup = time.perf_counter() - start
    widths = [tuple(b.ids.shape) for b in objective.batches]
    n_in = sum(b.ids.numel() for b in objective.batches)
    print(
        f"SmolLM2-135M-Instruct fp32, {len(examples)} examples, {objective.n_tokens} output tokens, "
        f"batches {widths} ({n_in} positions), torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}; objective setup {setup:.2f} s (tokenize + head check)"
    )

    sources = random_sources(model, 3, 8)
    mix = LoraMixture(model, sources)
    start = time.perf_counter()
    mix.set([0.5, 0.3, -0.2])
    set_cost = time.perf_counter() - start

    def with_mixture(fn):
        def run():
            with mix:
                return fn()

        return run

    contenders = {
        "naive: full logits + HF loss": lambda: naive(model, objective),
        "objective (ExamplesObjective)": objective,
        "floor: decoder body only": lambda: floor(model.model, objective),
        "objective + 3×r8 mixture": with_mixture(objective),
        "floor + 3×r8 mixture": with_mixture(lambda: floor(model.model, objective)),
        "naive + 3×r8 mixture": with_mixture(lambda: naive(model, objective)),
    }
    results = compare(contenders, args.repeat)
    floor_wall, floor_cpu = results["floor: decoder body only"][:2]
    print(
        f"\n| {'what':30} | {'wall s':>7} | {'CPU s':>7} | {'CPU × floor':>11} | {'value (nats/token)':>18} |"
    )
    print(f"|{'-' * 32}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 20}|")
    for what, (wall, cpu, value) in results.items():
        print(f"| {what:30} | {wall:7.2f} | {cpu:7.2f} | {cpu / floor_cpu:11.2f} | {value:18.6f} |")
    print(
        f"\nbest of {args.repeat} interleaved rounds after a warm-up; floor wall {floor_wall:.2f} s; "
        f"mixture.set() for {len(mix.modules)} modules: {set_cost * 1e3:.2f} ms; "
        f"load average now {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
