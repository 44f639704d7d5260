"""A small full fine-tune of SmolLM2-135M-Instruct on the headline skill, to show LoRA extraction on a real model.

Every weight of the attention and MLP projections of the top layers (20-29 of 30) is trained, no LoRA:
AdamW, batches of 8 from recipes/skills/data/headline_train.jsonl in a seeded order, loss on the completion only
(the same data and masking as scripts/skills/train.py). The result is a full fp32 model folder (540 MB, so it
lives in the cache, not in the repository):

    python scripts/skills/finetune.py            # -> ~/.cache/loracook/finetunes/smollm2-headline-full
    python scripts/skills/finetune.py --print    # print the folder; exit 1 if it is not built yet

recipes/skills/extract-headline.yaml turns it back into a rank-16 LoRA (`sources.X.extract`). The folder is
rebuilt only when its settings change (finetune.json records them, with the time taken and the loss curve).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import DATA, batches, collate, encode, read_jsonl  # noqa: E402

SETTINGS = {
    "skill": "headline",
    "data": "headline_train.jsonl",
    "layers": list(range(20, 30)),
    "modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "steps": 40,
    "batch_size": 8,
    "lr": 5e-5,
    "seed": 0,
}
NAME = "smollm2-headline-full"


def finetune_dir() -> Path:
    # a fixed place, because recipes/skills/extract-headline.yaml names it (`~` is expanded by loracook)
    return Path.home() / ".cache" / "loracook" / "finetunes" / NAME


def is_built(folder: Path | None = None) -> bool:
    folder = folder or finetune_dir()
    record = folder / "finetune.json"
    return record.is_file() and json.loads(record.read_text()).get("settings") == SETTINGS


def build(folder: Path | None = None) -> Path:
    """Run the fine-tune and write the folder atomically (a temporary folder renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.io.packaged import smollm2_folder

    folder = folder or finetune_dir()
    torch.manual_seed(SETTINGS["seed"])
    base = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    trained = []
    for name, param in model.named_parameters():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        train = (
            layer is not None
            and int(layer) in SETTINGS["layers"]
            and any(f".{m}." in name for m in SETTINGS["modules"])
        )
        param.requires_grad_(train)
        if train:
            trained.append(param)
    examples = encode(tokenizer, read_jsonl(DATA / SETTINGS["data"]))
    optimizer = torch.optim.AdamW(trained, lr=SETTINGS["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(SETTINGS["seed"])
    steps = SETTINGS["steps"]
    losses = []
    model.train()
    start = time.perf_counter()
    for step, index in enumerate(batches(len(examples), SETTINGS["batch_size"], steps, generator)):
        batch = collate([examples[i] for i in index], tokenizer.pad_token_id or tokenizer.eos_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(round(loss.item(), 4))
        if (step + 1) % 10 == 0:
            print(
                f"finetune step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.eval()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {
        "settings": SETTINGS,
        "trained_parameters": sum(p.numel() for p in trained),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps, 2),
        "losses": losses,
        "base": str(base),
    }
    (staging / "finetune.json").write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    print(
        f"saved {folder} after {seconds:.0f} s ({record['trained_parameters'] / 1e6:.1f}M parameters trained)"
    )
    return folder


def ensure() -> Path:
    """The fine-tune folder, built first if missing or stale."""
    folder = finetune_dir()
    return folder if is_built(folder) else build(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--print", action="store_true", help="print the folder; exit 1 if it is not built")
    parser.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    args = parser.parse_args()
    if args.print:
        print(finetune_dir())
        sys.exit(0 if is_built() else 1)
    if args.force:
        build()
    else:
        folder = ensure()
        print(folder)


if __name__ == "__main__":
    main()
