"""I/O floor: read every tensor of a checkpoint with safetensors and write each shard out again.

Usage: python io_floor.py BASE_DIR OUT_DIR

This is the least any merge-into-base tool has to do: read the base once, write the full model once.
Shards are processed one at a time (read all of a shard's tensors, save_file them, drop them).
"""

import json
import os
import shutil
import sys

from safetensors import safe_open
from safetensors.torch import save_file


def main() -> None:
    base, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    idx = os.path.join(base, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx))["weight_map"].values()))
        shutil.copy(idx, out)
    else:
        files = sorted(f for f in os.listdir(base) if f.endswith(".safetensors"))
    for name in files:
        with safe_open(os.path.join(base, name), framework="pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        save_file(tensors, os.path.join(out, name), metadata=meta)
        del tensors
    for extra in ("config.json", "generation_config.json"):
        if os.path.exists(os.path.join(base, extra)):
            shutil.copy(os.path.join(base, extra), out)


if __name__ == "__main__":
    main()
