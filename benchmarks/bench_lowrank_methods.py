"""KnOTS, Core Space and TSV in factor space against the dense computations of the papers, on SmolLM2 shapes.

For each SmolLM2-135M projection shape (q/o 576×576, k/v 192×576, gate/up 1536×576, down 576×1536) and
``--adapters`` random rank-``--rank`` adapters (fp32, mixed scales, mixed-sign weights), this times

- factored: ``loracook.ops.lowrank_merge`` (QR of stacked factors, SVDs of R × R cores; returns factors), and
- dense: the papers' computation in float64 from the dense ΔW_i (KnOTS: SVD of [ΔW_1 | … | ΔW_n];
  Core Space: SVDs of the stacked B and A, cores U_Bᵀ ΔW_i V_A, dense ΔW; TSV: an SVD of every ΔW_i and of
  the concatenated singular vectors), including forming the ΔW_i,

with the same ``inner`` merge (TIES at density 0.5, or ``--inner sum``), checks that both give the same ΔW
(relative Frobenius error), and prints the fastest and median times and the ratio of the fastest.

    .venv/bin/python benchmarks/bench_lowrank_methods.py            # 1 thread, 3 rank-8 adapters
    .venv/bin/python benchmarks/bench_lowrank_methods.py --threads 2 --inner sum --methods knots tsv
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch

from loracook.ops import sparsify
from loracook.ops.lowrank_merge import core_space, knots, tsv

SHAPES = {
    "q_proj/o_proj": (576, 576),
    "k_proj/v_proj": (192, 576),
    "gate/up_proj": (1536, 576),
    "down_proj": (576, 1536),
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


METHODS = {
    "knots": (knots, dense_knots),
    "core_space": (core_space, dense_core_space),
    "tsv": (lambda pairs, _inner: tsv(pairs), dense_tsv),
}

# ---------------------------------------------------------------- timing


def best_seconds(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(fastest, median) of ``repeats`` timed runs after one warm-up run.

    The fastest run is the one compared: on a shared machine the median mostly measures the other processes
    (seen: a 1.7 ms factored merge with a 10 ms median on 2 busy cores).
    """
    fn()  # warm-up: first-call allocations and LAPACK workspace queries
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", type=int, default=3, help="number of adapters merged (default 3)")
    parser.add_argument("--rank", type=int, default=8, help="rank of each adapter (default 8)")
    parser.add_argument(
        "--repeats", type=int, default=21, help="timed runs of each factored merge (default 21)"
    )
    parser.add_argument(
        "--dense-repeats", type=int, default=3, help="timed runs of each dense merge (default 3)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument(
        "--inner", choices=["ties", "sum"], default="ties", help="element-wise merge (default ties)"
    )
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    inner = make_inner(args.inner)

    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.adapters} adapters of rank {args.rank}, "
          f"inner={args.inner}, fastest of {args.repeats} (factored) / {args.dense_repeats} (dense) runs")  # fmt: skip
    header = (
        f"{'method':<11} {'module':<14} {'shape':>10} {'factored ms':>12} {'(median)':>9} {'dense ms':>10} "
        f"{'(median)':>9} {'speed-up':>9} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    ratios: dict[str, list[float]] = {m: [] for m in args.methods}
    for name in args.methods:
        factored, dense = METHODS[name]
        for module, (out, inp) in SHAPES.items():
            pairs = make_pairs(out, inp, args.adapters, args.rank, seed=out + inp)
            B, A = factored(pairs, inner)
            ref = dense(pairs, inner)
            err = float(torch.linalg.norm(B.double() @ A.double() - ref) / torch.linalg.norm(ref))
            t_fact, m_fact = best_seconds(lambda: factored(pairs, inner), args.repeats)  # noqa: B023
            t_dense, m_dense = best_seconds(lambda: dense(pairs, inner), args.dense_repeats)  # noqa: B023
            ratios[name].append(t_dense / t_fact)
            print(f"{name:<11} {module:<14} {f'{out}x{inp}':>10} {1e3 * t_fact:>12.2f} {1e3 * m_fact:>9.2f} "
                  f"{1e3 * t_dense:>10.1f} {1e3 * m_dense:>9.1f} {t_dense / t_fact:>8.1f}x {err:>8.1e}")  # fmt: skip
    print()
    for name, values in ratios.items():
        geo = math.exp(sum(map(math.log, values)) / len(values))
        print(f"{name:<11} speed-up: geometric mean {geo:.1f}x, min {min(values):.1f}x")


if __name__ == "__main__":
    main()
