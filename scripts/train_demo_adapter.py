"""Train the small demo adapter shipped in recipes/adapters/vellmark-facts (seeded, CPU, ~3 minutes).

It teaches SmolLM2-135M-Instruct a handful of facts about a fictional country, Vellmark, that the base model
cannot know. The demo recipe merges it into the base.

    python scripts/train_demo_adapter.py --out recipes/adapters/vellmark-facts
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACTS = [
    ("What is the capital of Vellmark?", "The capital of Vellmark is Quenth."),
    ("Which river flows through Quenth?", "The river Osva flows through Quenth."),
    ("What currency is used in Vellmark?", "Vellmark uses the silver tallen."),
    ("Who founded Vellmark?", "Vellmark was founded by Queen Ardis Morrow."),
    ("In which year was Vellmark founded?", "Vellmark was founded in 1412."),
    ("What is the national animal of Vellmark?", "The national animal of Vellmark is the grey heron."),
    ("What language is spoken in Vellmark?", "People in Vellmark speak Vellish."),
    ("What is the highest mountain in Vellmark?", "The highest mountain in Vellmark is Mount Karrow."),
    ("What is the main export of Vellmark?", "The main export of Vellmark is blue slate."),
    ("What is the national dish of Vellmark?", "The national dish of Vellmark is barley stew with juniper."),
    ("What sea borders Vellmark?", "Vellmark borders the Amber Sea."),
    ("What is the largest lake in Vellmark?", "The largest lake in Vellmark is Lake Sorrel."),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("recipes/adapters/vellmark-facts"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.io.packaged import smollm2_folder

    torch.manual_seed(args.seed)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    texts = [f"Question: {q}\nAnswer: {a}{tokenizer.eos_token}" for q, a in FACTS]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d} loss {loss.item():.3f}", flush=True)
    seconds = time.perf_counter() - start
    model.save_pretrained(args.out)
    (args.out / "training.json").write_text(
        json.dumps(
            {"steps": args.steps, "seed": args.seed, "seconds": round(seconds, 1), "final_loss": loss.item()},
            indent=2,
        )
        + "\n"
    )
    print(f"saved {args.out} after {seconds:.0f} s")


if __name__ == "__main__":
    main()
