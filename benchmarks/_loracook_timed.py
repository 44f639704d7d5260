"""loracook contender for bench_adapters.py: the CLI in-process, with its phases timed like _peft_weighted.py.

Usage: python _loracook_timed.py run RECIPE [--force ...]   (any loracook CLI arguments)

Prints one line ``LORACOOK_TIMES {json}``: ``import_s`` (interpreter start to torch and loracook's modules imported) and
``run_s`` (the command itself: plan, read, merge, write), so the harness can set the operation against PEFT's
``add_weighted_adapter`` call as well as the whole process against PEFT's whole process.
"""

import json
import sys
import time

t_start = time.perf_counter()

# Everything a run imports is imported here, as PEFT's script imports peft and transformers up front, so that
# run_s holds no start-up (loracook imports its engine and math modules lazily to keep the CLI quick).
import torch  # noqa: E402, F401

import loracook.engine  # noqa: E402, F401
import loracook.ops.factored  # noqa: E402, F401
import loracook.ops.lowrank  # noqa: E402, F401
import loracook.ops.rng  # noqa: E402, F401
import loracook.ops.sparsify  # noqa: E402, F401
import loracook.recipe.load  # noqa: E402, F401
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
