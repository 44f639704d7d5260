"""PEFT contender: load base + adapter, merge_and_unload(), save_pretrained().

Usage: python peft_merge.py BASE_DIR ADAPTER_DIR OUT_DIR DTYPE [MAX_SHARD_SIZE]
"""

import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> None:
    base, adapter, out, dtype = sys.argv[1:5]
    shard = sys.argv[5] if len(sys.argv) > 5 else "2GB"
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter)
    model = model.merge_and_unload()
    model.save_pretrained(out, max_shard_size=shard)


if __name__ == "__main__":
    main()
