"""PEFT contender for bench_adapters.py: load base + N adapters, add_weighted_adapter, save the new adapter.

Usage: python _peft_weighted.py BASE OUT COMBINATION RANK|none ADAPTER:WEIGHT [ADAPTER:WEIGHT ...]

Prints one line ``PEFT_TIMES {json}`` with the seconds spent in each phase (the harness times the whole
process from outside; ``add_weighted_adapter_s`` is the call alone).
"""

import json
import sys
import time

t_start = time.perf_counter()

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402


def main() -> None:
    base, out, combination, rank = sys.argv[1:5]
    pairs = [a.rsplit(":", 1) for a in sys.argv[5:]]
    adapters = [p for p, _ in pairs]
    weights = [float(w) for _, w in pairs]
    t_import = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(model, adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], adapters[1:]):
        pm.load_adapter(path, adapter_name=name)
    t_loaded = time.perf_counter()
    kwargs = {"svd_rank": int(rank)} if rank != "none" else {}
    pm.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)
    t_combined = time.perf_counter()
    pm.save_pretrained(out, selected_adapters=["merged"])
    t_saved = time.perf_counter()
    times = {
        "import_s": t_import - t_start,
        "load_s": t_loaded - t_import,
        "add_weighted_adapter_s": t_combined - t_loaded,
        "save_s": t_saved - t_combined,
    }
    print("PEFT_TIMES " + json.dumps(times), flush=True)


if __name__ == "__main__":
    main()
