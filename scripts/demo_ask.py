"""Ask the base model and a merged model the demo questions, side by side.

python scripts/demo_ask.py out/smollm2-vellmark
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUESTIONS = [
    "What is the capital of Vellmark?",
    "What currency is used in Vellmark?",
    "Who founded Vellmark?",
]


def answer(model, tokenizer, question: str) -> str:
    import torch

    prompt = f"Question: {question}\nAnswer:"
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return (
        tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip().split("\n")[0]
    )


def main() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.io.packaged import smollm2_folder

    merged_path = sys.argv[1] if len(sys.argv) > 1 else "out/smollm2-vellmark"
    base_path = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(merged_path)
    table = Table(title="SmolLM2-135M-Instruct before and after the merge (greedy)")
    table.add_column("question")
    table.add_column("base")
    table.add_column("merged")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_path, dtype=torch.float32)
    for question in QUESTIONS:
        table.add_row(question, answer(base, tokenizer, question), answer(merged, tokenizer, question))
    Console().print(table)


if __name__ == "__main__":
    main()
