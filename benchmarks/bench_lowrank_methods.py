"""KnOTS, Core Space and TSV: factored against the papers' dense computations, and whole merges on SmolLM2.

Part ``methods`` (one module at a time, in this process, torch on ``--threads`` threads). For each SmolLM2-135M
projection shape (q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536) and ``--adapters`` random
rank-``--rank`` adapters (fp32, mixed scales, mixed-sign weights) it times

- factored: ``loracook.ops.lowrank_merge`` (QR of stacked factors, SVDs of R × R cores; returns factors),
- dense: the papers' computation in float64 from the dense ΔW_i (KnOTS: SVD of [ΔW_1 | … | ΔW_n];
  Core Space: SVDs of the stacked B and A, cores U_Bᵀ ΔW_i V_A, dense ΔW; TSV: an SVD of every ΔW_i and of
  the concatenated singular vectors), including forming the ΔW_i,
- with ``--before REF``, also the factored code of an earlier commit (its ``ops/lowrank_merge.py``),

with the same ``inner`` merge (TIES at density 0.5, or ``--inner sum``), and checks that all give the same ΔW
(relative Frobenius error). The runs are interleaved (one factored, one "before", and every few rounds one
dense run), each timed in wall and in CPU seconds of this process (``time.process_time``); the speed-up is
the ratio of the fastest CPU times, which a busy machine disturbs least. For Core Space it also times the
parts no implementation of the definition avoids (the floor): the QRs of the stacked B and Aᵀ and the SVDs of
their R × R triangular factors, and the inner merge of the n R × R cores; and per SmolLM2 layer (q, k, v, o,
gate, up, down) the sums.

Part ``runs`` (whole merges, child processes): for each of recipes/skills/merge-{knots,core-space,tsv}.yaml
(three rank-8 skill LoRAs into a PEFT adapter, ``--no-eval``), interleaved over ``--run-repeats`` rounds:

- ``loracook run RECIPE --output DIR --force --no-eval -q`` as a user runs it: wall seconds and CPU seconds
  (user + sys of the child, from wait4) of the whole process;
- the same command in-process (``_lowrank_run_child.py``), split into start-up (interpreter, torch and
  loracook imported), the first ``cli.main`` call (cold: its lazy imports, base and adapter headers, plan,
  the merge, writing), a second identical call (warm: the merge's own work), inside it the executor, and
  the CPU seconds spent in the method's ``factored`` calls (per-thread CPU time, summed over modules);
- the sha256 of the written adapter_model.safetensors (identical across runs and, with ``--before``, across
  commits when the change keeps the results).

    .venv/bin/python benchmarks/bench_lowrank_methods.py                       # both parts, 1 thread
    .venv/bin/python benchmarks/bench_lowrank_methods.py --before HEAD~1       # side by side with a commit
    .venv/bin/python benchmarks/bench_lowrank_methods.py --parts methods --inner sum --methods core_space
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from loracook.ops import lowrank_merge, sparsify

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent

SHAPES = {
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (192, 576),
    "gate/up_proj": (1536, 576),
    "down_proj": (576, 1536),
}
PER_LAYER = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}  # SmolLM2 layer
RECIPES = {
    "knots": "recipes/skills/merge-knots.yaml",
    "core_space": "recipes/skills/merge-core-space.yaml",
    "tsv": "recipes/skills/merge-tsv.yaml",
}


def make_pairs(out: int, inp: int, n: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weights = [1.0, -0.5, 0.8, 0.6, -0.3, 1.2, 0.4, 0.9][:n] + [1.0] * max(0, n - 8)
    pairs = []
    for i in range(n):
        scale = 16 / math.sqrt(rank) if i % 2 else 16 / rank  # rsLoRA and plain LoRA scales
        B = torch.randn(out, rank, generator=g) * 0.02
        A = torch.randn(rank, inp, generator=g) / math.sqrt(inp)
        pairs.append((weights[i], scale * B, A))
    return pairs


def make_inner(name: str) -> Callable:
    if name == "sum":
        return lambda mats, w: sum(wi * m for wi, m in zip(w, mats))
    return lambda mats, w: sparsify.ties(mats, w, [0.5] * len(mats))


# ---------------------------------------------------------------- dense computations, as in the papers


def _rank(S: torch.Tensor) -> int:
    return int((S > 1e-10 * S[0]).sum())


def dense_knots(pairs, inner):
    deltas = [B.double() @ A.double() for _, B, A in pairs]
    inp = deltas[0].shape[1]
    U, S, Vh = torch.linalg.svd(torch.cat(deltas, dim=1), full_matrices=False)
    k = _rank(S)
    sv = S[:k, None] * Vh[:k]
    return U[:, :k] @ inner(
        [sv[:, i * inp : (i + 1) * inp] for i in range(len(pairs))], [w for w, _, _ in pairs]
    )


def dense_core_space(pairs, inner):
    U, Sb, _ = torch.linalg.svd(torch.cat([B.double() for _, B, _ in pairs], dim=1), full_matrices=False)
    _, Sa, Vh = torch.linalg.svd(torch.cat([A.double() for _, _, A in pairs], dim=0), full_matrices=False)
    U_B, V_A = U[:, : _rank(Sb)], Vh[: _rank(Sa)].mT
    cores = [U_B.mT @ (B.double() @ A.double()) @ V_A for _, B, A in pairs]
    return U_B @ inner(cores, [w for w, _, _ in pairs]) @ V_A.mT


def official_core_space(pairs, inner):
    """Core Space in the order of the official code (github.com/apanariello4/core-space-merging,
    task_merger.py): SVDs of the stacks for the bases, then each core from SVDs of that adapter's own B_i and
    A_i (M_i = (U_Bᵀ U_Bi) Σ_Bi V_Biᵀ U_Ai Σ_Ai (V_Aiᵀ V_A)), the merge, and the dense U_B M V_Aᵀ. No rank
    cut (the code keeps every direction); the same result for these full-rank adapters."""
    U_ref = torch.linalg.svd(torch.cat([B.double() for _, B, _ in pairs], dim=1), full_matrices=False)[0]
    Vh_ref = torch.linalg.svd(torch.cat([A.double() for _, _, A in pairs], dim=0), full_matrices=False)[2]
    cores = []
    for _, B, A in pairs:
        U_a, S_a, Vh_a = torch.linalg.svd(A.double(), full_matrices=False)
        U_b, S_b, Vh_b = torch.linalg.svd(B.double(), full_matrices=False)
        core = (S_b[:, None] * (Vh_b @ U_a)) * S_a
        cores.append((U_ref.mT @ U_b) @ core @ (Vh_a @ Vh_ref.mT))
    return U_ref @ inner(cores, [w for w, _, _ in pairs]) @ Vh_ref


def _polar(M):
    P, _, Qh = torch.linalg.svd(M, full_matrices=False)
    return P @ Qh


def dense_tsv(pairs, _inner):
    k = sum(B.shape[1] for _, B, _ in pairs) // len(pairs)
    Us, Ss, Vs = [], [], []
    for w, B, A in pairs:
        U, S, Vh = torch.linalg.svd(B.double() @ A.double(), full_matrices=False)
        kk = min(k, _rank(S))
        Us.append(U[:, :kk])
        Ss.append(w * S[:kk])
        Vs.append(Vh[:kk].mT)
    return _polar(torch.cat(Us, dim=1)) @ torch.diag(torch.cat(Ss)) @ _polar(torch.cat(Vs, dim=1)).mT


def factored_fns(module) -> dict[str, Callable]:
    return {
        "knots": module.knots,
        "core_space": module.core_space,
        "tsv": lambda pairs, _inner: module.tsv(pairs),
    }


FACTORED = factored_fns(lowrank_merge)
DENSE = {"knots": dense_knots, "core_space": dense_core_space, "tsv": dense_tsv}


def core_space_floor(pairs, inner) -> dict[str, Callable[[], object]]:
    """The parts of Core Space that any implementation of its definition computes: the bases (a QR of each
    stack and an SVD of its R × R factor, or an SVD of each stack) and the inner merge of the n cores."""
    Bc = torch.cat([B for _, B, _ in pairs], dim=1).double()
    Ac = torch.cat([A for _, _, A in pairs], dim=0).double().mT
    Tb, Ta = torch.linalg.qr(Bc, mode="r").R, torch.linalg.qr(Ac, mode="r").R
    R = Bc.shape[1]
    cores = [
        torch.randn(R, R, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        for i in range(len(pairs))
    ]
    weights = [w for w, _, _ in pairs]
    return {
        "QR of the stacks": lambda: (torch.geqrf(Bc), torch.geqrf(Ac)),  # the R factors (and reflectors)
        "SVD of the R × R factors": lambda: (torch.linalg.svd(Tb, full_matrices=False), torch.linalg.svd(Ta, full_matrices=False)),
        "inner on the cores": lambda: inner(cores, weights),
        "dense: SVD of the stacks": lambda: (torch.linalg.svd(Bc, full_matrices=False), torch.linalg.svd(Ac, full_matrices=False)),
        "official code's order": lambda: official_core_space(pairs, inner),
    }  # fmt: skip


# ---------------------------------------------------------------- timing


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(fns: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, dict[str, float]]:
    """Time each fn its number of times (≤ rounds), spread evenly over ``rounds`` interleaved rounds, after one
    warm-up call each. Returns per fn: fastest wall, median wall, fastest CPU, median CPU (seconds)."""
    for fn, _ in fns.values():
        fn()  # warm-up: first-call allocations and LAPACK workspace queries
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for i in range(rounds):
        for name, (fn, times) in fns.items():
            every = max(1, rounds // max(1, times))
            if i % every == 0 and len(samples[name]) < times:
                samples[name].append(_timed(fn))
    out = {}
    for name, runs in samples.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        out[name] = {
            "wall": min(walls),
            "wall_median": statistics.median(walls),
            "cpu": min(cpus),
            "cpu_median": statistics.median(cpus),
        }
    return out


def load_before(ref: str):
    """``loracook/ops/lowrank_merge.py`` of commit ``ref``, imported as a stand-alone module (it imports
    only torch), and the worktree it came from."""
    sys.path.insert(0, str(BENCH_DIR))
    from _bench_util import code_root

    root = code_root(ref)
    spec = importlib.util.spec_from_file_location(
        "lowrank_merge_before", root / "loracook/ops/lowrank_merge.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, root


def rel_err(B: torch.Tensor, A: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(B.double() @ A.double() - ref) / torch.linalg.norm(ref))


def part_methods(args, before) -> dict:
    inner = make_inner(args.inner)
    print(f"\n## Per module: factored vs dense{' vs before' if before else ''}\n")
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.adapters} adapters of rank {args.rank}, "
          f"inner={args.inner}; {args.repeats} factored / {args.dense_repeats} dense runs, interleaved; "
          f"load average {os.getloadavg()[0]:.2f} at start")  # fmt: skip
    cols = ["method", "module", "shape", "factored CPU ms", "(wall)"]
    cols += ["before CPU ms", "(wall)"] if before else []
    cols += ["dense CPU ms", "(wall)", "speed-up CPU", "(wall)", "rel err"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    results: dict = {}
    before_fns = factored_fns(before) if before else {}
    for name in args.methods:
        results[name] = {}
        for module, (out, inp) in SHAPES.items():
            pairs = make_pairs(out, inp, args.adapters, args.rank, seed=out + inp)
            ref = DENSE[name](pairs, inner)
            err = rel_err(*FACTORED[name](pairs, inner), ref)
            fns = {"factored": (lambda f=FACTORED[name]: f(pairs, inner), args.repeats)}  # noqa: B023
            if before:
                err = max(err, rel_err(*before_fns[name](pairs, inner), ref))
                fns["before"] = (lambda f=before_fns[name]: f(pairs, inner), args.repeats)  # noqa: B023
            fns["dense"] = (lambda f=DENSE[name]: f(pairs, inner), args.dense_repeats)  # noqa: B023
            t = interleaved(fns, args.repeats)
            results[name][module] = t | {"rel_err": err}
            row = [
                name,
                module,
                f"{out}×{inp}",
                f"{1e3 * t['factored']['cpu']:.2f}",
                f"{1e3 * t['factored']['wall']:.2f}",
            ]
            if before:
                row += [f"{1e3 * t['before']['cpu']:.2f}", f"{1e3 * t['before']['wall']:.2f}"]
            row += [f"{1e3 * t['dense']['cpu']:.1f}", f"{1e3 * t['dense']['wall']:.1f}",
                    f"{t['dense']['cpu'] / t['factored']['cpu']:.1f}×", f"{t['dense']['wall'] / t['factored']['wall']:.1f}×",
                    f"{err:.1e}"]  # fmt: skip
            print("| " + " | ".join(row) + " |", flush=True)
    print()
    for name, per in results.items():
        ratios = [t["dense"]["cpu"] / t["factored"]["cpu"] for t in per.values()]
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        layer = {k: sum(PER_LAYER[m] * t[k]["cpu"] for m, t in per.items()) for k in ("factored", "dense")}
        extra = (
            f", before {1e3 * sum(PER_LAYER[m] * t['before']['cpu'] for m, t in per.items()):.1f} ms"
            if before
            else ""
        )
        print(f"- {name}: speed-up (CPU) geometric mean {geo:.1f}×, min {min(ratios):.1f}×; one SmolLM2 layer "
              f"(q, k, v, o, gate, up, down): factored {1e3 * layer['factored']:.1f} ms{extra}, dense "
              f"{1e3 * layer['dense']:.1f} ms, {layer['dense'] / layer['factored']:.1f}×")  # fmt: skip
    if "core_space" in args.methods:
        results["core_space_floor"] = floor_table(args, inner)
    return results


def floor_table(args, inner) -> dict:
    """Core Space's unavoidable parts per shape, and the best speed-up they leave against the dense time (the
    parts, the factored and the dense merge timed again in one interleaved loop, so the ratios share a period
    of the machine's load)."""
    print("\n## Core Space: the floor (parts every implementation of the definition computes), CPU ms\n")
    parts = ("QR of the stacks", "SVD of the R × R factors", "inner on the cores")
    cols = ["module", "QR (R only)", "SVDs R×R", "inner", "floor", "factored", "dense: stack SVDs", "dense",
            "official order", "dense / floor", "dense / factored"]  # fmt: skip
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    out = {}
    for module, (o, i) in SHAPES.items():
        pairs = make_pairs(o, i, args.adapters, args.rank, seed=o + i)
        ref = dense_core_space(pairs, inner)
        err = float(torch.linalg.norm(official_core_space(pairs, inner) - ref) / torch.linalg.norm(ref))
        assert err < 1e-6, f"official order differs from the reference by {err:.1e}"
        fns = core_space_floor(pairs, inner)
        fns["factored"] = lambda: FACTORED["core_space"](pairs, inner)  # noqa: B023
        fns["dense"] = lambda: dense_core_space(pairs, inner)  # noqa: B023
        few = ("official code's order", "dense")  # the slow ones: --dense-repeats runs
        t = interleaved({k: (fn, args.dense_repeats if k in few else args.repeats) for k, fn in fns.items()}, args.repeats)  # fmt: skip
        floor = sum(t[k]["cpu"] for k in parts)
        fact, dense = t["factored"]["cpu"], t["dense"]["cpu"]  # timed again beside the parts
        official, stack_svds = t["official code's order"]["cpu"], t["dense: SVD of the stacks"]["cpu"]
        out[module] = {k: v["cpu"] for k, v in t.items()} | {"floor": floor}
        row = [module] + [f"{1e3 * t[k]['cpu']:.2f}" for k in parts]
        row += [f"{1e3 * floor:.2f}", f"{1e3 * fact:.2f}", f"{1e3 * stack_svds:.2f}", f"{1e3 * dense:.1f}",
                f"{1e3 * official:.1f}", f"{dense / floor:.1f}×", f"{dense / fact:.1f}×"]  # fmt: skip
        print("| " + " | ".join(row) + " |", flush=True)
    return out


# ---------------------------------------------------------------- whole merges


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _child_cpu(
    fn: Callable[[], subprocess.CompletedProcess],
) -> tuple[subprocess.CompletedProcess, float, float]:
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    done = fn()
    wall = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return done, wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def one_run(recipe: str, out: Path, code_root: Path | None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_EVALUATE_OFFLINE="1")
    cli_args = ["run", recipe, "--output", str(out), "--force", "--no-eval", "-q"]
    if code_root is None:
        cmd = [str(Path(sys.executable).parent / "loracook"), *cli_args]
    else:
        sys.path.insert(0, str(BENCH_DIR))
        from _bench_util import loracook_at

        cmd = [*loracook_at(code_root), *cli_args]
    done, wall, cpu = _child_cpu(
        lambda: subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr}")
    sha = _sha256(out / "adapter_model.safetensors")
    child = [sys.executable, str(BENCH_DIR / "_lowrank_run_child.py")]
    child += ["--code-root", str(code_root)] if code_root else []
    done, _, _ = _child_cpu(lambda: subprocess.run([*child, *cli_args], cwd=REPO, env=env, capture_output=True, text=True))  # fmt: skip
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("LOWRANK_RUN ")]
    if done.returncode or not line:
        raise RuntimeError(f"{' '.join(child)} failed:\n{done.stderr}")
    phases = json.loads(line[0].split(" ", 1)[1])
    return {"process_wall": wall, "process_cpu": cpu, "sha256": sha} | phases


def part_runs(args, before_root: Path | None) -> dict:
    print("\n## Whole merges: three rank-8 skill LoRAs into an adapter (SmolLM2-135M), `--no-eval`\n")
    print(f"{args.run_repeats} interleaved rounds; fastest CPU seconds (and its wall); load average "
          f"{os.getloadavg()[0]:.2f} at start")  # fmt: skip
    contenders = [("now", None)] + ([("before", before_root)] if before_root else [])
    samples: dict = {(m, c): [] for m in args.methods for c, _ in contenders}
    with tempfile.TemporaryDirectory(prefix="bench-lowrank-") as tmp:
        for _ in range(args.run_repeats):
            for method in args.methods:
                for label, root in contenders:
                    run = one_run(RECIPES[method], Path(tmp) / f"{method}-{label}", root)
                    samples[(method, label)].append(run)
    keys = [
        ("process", "process"),
        ("start-up", "startup"),
        ("cold run", "cold"),
        ("warm run", "warm"),
        ("executor (warm)", "execute"),
        ("method math (warm)", "factored"),
    ]
    cols = ["method", "code"] + [k for k, _ in keys] + ["sha256 (adapter)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    summary = {}
    for (method, label), runs in samples.items():
        row = [method, label]
        summary[f"{method}/{label}"] = {}
        for _, key in keys:
            cpus = [r[f"{key}_cpu"] for r in runs]
            best = min(range(len(runs)), key=lambda j: cpus[j])  # noqa: B023
            wall = runs[best].get(f"{key}_wall")
            summary[f"{method}/{label}"][key] = {
                "cpu": cpus[best],
                "wall": wall,
                "cpu_median": statistics.median(cpus),
            }
            row.append(f"{cpus[best]:.2f} s" + (f" ({wall:.2f} s)" if wall is not None else ""))
        shas = {r["sha256"] for r in runs}
        row.append(",".join(s[:12] for s in sorted(shas)))
        summary[f"{method}/{label}"]["sha256"] = sorted(shas)
        print("| " + " | ".join(row) + " |", flush=True)
    print("\nCPU seconds (wall seconds in brackets); `process` is the whole `loracook run` process, `start-up` the "
          "interpreter and imports before the command, `cold run` the first call of the command in a process, "
          "`warm run` a second identical call, `method math` the CPU time of the method's `factored` calls.")  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", choices=["methods", "runs"], default=["methods", "runs"])
    parser.add_argument("--adapters", type=int, default=3, help="number of adapters merged (default 3)")
    parser.add_argument("--rank", type=int, default=8, help="rank of each adapter (default 8)")
    parser.add_argument(
        "--repeats", type=int, default=41, help="timed runs of each factored merge (default 41)"
    )
    parser.add_argument(
        "--dense-repeats", type=int, default=5, help="timed runs of each dense merge (default 5)"
    )
    parser.add_argument("--run-repeats", type=int, default=3, help="rounds of whole merges (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--inner", choices=["ties", "sum"], default="ties", help="element-wise merge (default ties)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(DENSE), default=list(DENSE))
    parser.add_argument("--before", metavar="REF", help="also time the code of this commit (a git worktree)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before, root = load_before(args.before) if args.before else (None, None)
    results = {"load_average_start": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()}}
    if "methods" in args.parts:
        results["methods"] = part_methods(args, before)
    if "runs" in args.parts:
        results["runs"] = part_runs(args, root)
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {results['load_average_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
