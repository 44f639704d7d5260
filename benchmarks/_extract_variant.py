"""Floors for bench_extract.py: ``loracook run`` with its low-rank step replaced, to show what the rest costs.

Usage: python _extract_variant.py MODE run RECIPE --force      (MODE: nosvd | plain1 | plain2)

  nosvd   no SVD at all (zero factors): start-up, reading, ΔW, writing — the floor of any extraction
  plain1  plain subspace iteration with 1 power iteration and no check (no bound on the error)
  plain2  the same with 2 power iterations (what ``torch.svd_lowrank(q=72, niter=2)`` does)
"""

import sys

import loracook.ops.lowrank as factored
from loracook import cli

_real = factored.low_rank_dense


def _variant(mode: str):
    def low_rank_dense(M, rank, **kwargs):
        kwargs.pop("tol", None)
        kwargs.pop("check", None)
        if mode == "nosvd":
            zeros = M.new_zeros(M.shape[0], rank), M.new_zeros(rank, M.shape[1]), M.new_zeros(rank)
            return factored._result(*zeros, 1.0, 1.0, "randomized", 0)
        return _real(M, rank, tol=None, niter={"plain1": 1, "plain2": 2}[mode], **kwargs)

    return low_rank_dense


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode not in ("nosvd", "plain1", "plain2"):
        sys.exit(f"unknown mode {mode!r}; use nosvd, plain1 or plain2")
    factored.low_rank_dense = _variant(mode)  # extraction looks it up at call time
    sys.exit(cli.main(sys.argv[2:]))
