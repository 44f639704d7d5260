"""Child of bench_lowrank_methods.py (part ``runs``): one `loracook run` command in-process, its phases timed.

Usage: python _lowrank_run_child.py [--code-root DIR] run RECIPE --output DIR --force --no-eval -q

Prints one line ``LOWRANK_RUN {json}`` with wall (``*_wall``) and CPU (``*_cpu``, all threads of the process)
seconds of: ``startup`` (interpreter start to torch and loracook imported; the CPU figure includes the
interpreter's own start, the wall figure starts at this file's first line), ``cold`` (the first ``cli.main``
call: lazy imports, headers, plan, merge, write), ``warm`` (a second identical call), ``execute`` (the
executor inside the warm call) and ``factored_cpu`` (per-thread CPU seconds of the method's ``factored``
calls in the warm call, summed over modules) with ``modules`` (their number).
"""

import time

W0 = time.perf_counter()

import importlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

if sys.argv[1:2] == ["--code-root"]:  # an earlier commit's source tree instead of the installed one
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
    sys.path.insert(0, sys.argv[2])
    del sys.argv[1:3]

import torch  # noqa: E402, F401

for _name in ("engine", "ops.factored", "ops.lowrank", "ops.lowrank_merge", "ops.sparsify", "recipe.load"):
    importlib.import_module(f"loracook.{_name}")
from loracook import cli, engine, methods  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    t_import = (time.perf_counter(), time.process_time())
    spent: list[float] = []
    for name in ("knots", "core_space", "tsv"):
        method = methods.get(name)
        inner = method.factored

        def timed(*args, _inner=inner, **kwargs):
            c = time.thread_time()
            try:
                return _inner(*args, **kwargs)
            finally:
                spent.append(time.thread_time() - c)

        method.factored = timed  # the plan holds the registered instance
    executed: list[tuple[float, float]] = []
    run_execute = engine._execute

    def execute(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return run_execute(*args, **kwargs)
        finally:
            executed.append((time.perf_counter() - w, time.process_time() - c))

    engine._execute = execute
    if cli.main(argv):
        return 1
    t_cold = (time.perf_counter(), time.process_time())
    spent.clear()
    if cli.main(argv):
        return 1
    t_warm = (time.perf_counter(), time.process_time())
    times = {
        "startup_wall": t_import[0] - W0,
        "startup_cpu": t_import[1],  # process CPU time since the process started
        "cold_wall": t_cold[0] - t_import[0],
        "cold_cpu": t_cold[1] - t_import[1],
        "warm_wall": t_warm[0] - t_cold[0],
        "warm_cpu": t_warm[1] - t_cold[1],
        "execute_wall": executed[-1][0],
        "execute_cpu": executed[-1][1],
        "factored_cpu": sum(spent),
        "modules": len(spent),
    }
    print("LOWRANK_RUN " + json.dumps(times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
