"""loracook contender for bench_adapters.py: the CLI in-process, with its phases timed like _peft_weighted.py.

Usage: python _loracook_timed.py [--code-root DIR] run RECIPE [--force ...]   (any loracook CLI arguments)

Prints one line ``LORACOOK_TIMES {json}``: ``import_s`` (interpreter start to torch and loracook's modules imported) and
``run_s`` (the command itself: plan, read, merge, write), so the harness can set the operation against PEFT's
``add_weighted_adapter`` call as well as the whole process against PEFT's whole process.
"""

import importlib
import json
import sys
import time

t_start = time.perf_counter()

# `--code-root DIR` first: run the loracook source tree there (a worktree of an earlier commit, for
# side-by-side comparisons) instead of the installed one.
if sys.argv[1:2] == ["--code-root"]:
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path.insert(0, sys.argv[2])
    del sys.argv[1:3]

# Everything a run imports is imported here, as PEFT's script imports peft and transformers up front, so that
# run_s holds no start-up (loracook imports its engine and math modules lazily to keep the CLI quick).
import torch  # noqa: E402, F401

for _module in ("engine", "ops.factored", "ops.lowrank", "ops.rng", "ops.sparsify", "recipe.load"):
    try:
        importlib.import_module(f"loracook.{_module}")
    except ImportError:  # an earlier commit's tree may not have it
        pass
from loracook import cli  # noqa: E402


def main() -> int:
    t_import = time.perf_counter()
    code = cli.main(sys.argv[1:] + ["--quiet"])
    t_run = time.perf_counter()
    times = {"import_s": t_import - t_start, "run_s": t_run - t_import}
    print("LORACOOK_TIMES " + json.dumps(times), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
