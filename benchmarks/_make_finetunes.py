"""Fine-tunes for bench_extract.py (run as a child process; outputs cached under benchmarks/.work/).

python _make_finetunes.py smollm2 BASE OUT [--steps 10 --lr 3e-5 --seed 0]
    A few full-rank AdamW steps (seeded) on the 7 linear projections of every layer of SmolLM2-135M
    (q,k,v,o,gate,up,down; embeddings and norms frozen), causal-LM loss on the source text of Python's
    ``argparse`` module (batches of 4 × 128 tokens). Saved as one fp32 safetensors file with exactly the
    base's tensor names, plus the base's config and tokenizer files.

python _make_finetunes.py synthetic BASE OUT [--delta-rank 32 --delta-std 2e-3 --noise-std 2e-4 --seed 7]
    For every linear projection weight W (bf16) of the synthetic Llama: W_ft = bf16(W + U Vᵀ + N), with
    U Vᵀ a random rank-``delta-rank`` matrix whose entries have std ``delta-std`` (10 % of the weights' std
    0.02) and N Gaussian noise of std ``noise-std`` (full rank). Everything else is copied byte for byte.
    Streamed tensor by tensor: each output shard gets the base shard's header verbatim and then the
    tensors' bytes in file order, so one tensor is in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

PROJ = tuple(common.TARGET_PROJ)


def _copy_side_files(base: Path, out: Path) -> None:
    for f in base.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)


def smollm2(args) -> None:
    import argparse as argparse_module
    import inspect

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, out = Path(args.base), Path(args.out)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    trained = []
    for name, p in model.named_parameters():
        train = name.endswith(".weight") and any(f".{t}." in name for t in PROJ) and ".layers." in name
        p.requires_grad_(train)
        if train:
            trained.append((name, p))
    text = inspect.getsource(argparse_module)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    bs, seq = args.batch, args.seq
    opt = torch.optim.AdamW([p for _, p in trained], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (bs,), generator=g)
        batch = torch.stack([ids[s : s + seq] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(
            f"[finetune] step {step + 1}/{args.steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    files = sorted(base.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"expected one safetensors file in {base}")
    sd = load_file(str(files[0]))
    params = dict(model.named_parameters())
    changed = 0
    for name in sd:
        if name in params and params[name].requires_grad:
            new = params[name].detach().to(sd[name].dtype).contiguous()
            changed += int(not torch.equal(new, sd[name]))
            sd[name] = new
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    save_file(sd, str(out / files[0].name), metadata={"format": "pt"})
    _copy_side_files(base, out)
    info = {
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "batch": [bs, seq],
        "trained": len(trained),
        "changed": changed,
        "text": "inspect.getsource(argparse)",
        "tokens": ids.numel(),
    }
    common._mark_done(out, info)
    print(f"[finetune] wrote {out}: {changed} changed tensors", flush=True)


def synthetic(args) -> None:
    import torch
    from safetensors import safe_open

    base, out = Path(args.base), Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    files = common.safetensors_files(base)
    t0 = time.perf_counter()
    r = args.delta_rank
    n_changed = 0
    for fp in files:
        with open(fp, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            raw_header = f.read(n)
        header = json.loads(raw_header)
        header.pop("__metadata__", None)
        data0 = 8 + n
        order = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        with open(fp, "rb") as src, open(out / fp.name, "wb") as dst, safe_open(str(fp), "pt") as h:
            dst.write(n.to_bytes(8, "little"))
            dst.write(raw_header)
            for name, meta in order:
                b0, b1 = meta["data_offsets"]
                assert dst.tell() == data0 + b0, (name, dst.tell(), data0 + b0)
                module = name.rsplit(".", 1)[0]
                if len(meta["shape"]) == 2 and module.rsplit(".", 1)[-1] in PROJ:
                    W = h.get_tensor(name).float()
                    out_f, in_f = W.shape
                    g = torch.Generator().manual_seed(common._seed_for(name, args.seed))
                    c = args.delta_std / r**0.5
                    U = torch.randn(out_f, r, generator=g) * c
                    V = torch.randn(in_f, r, generator=g)
                    W.add_(U @ V.T)
                    W.add_(torch.randn(W.shape, generator=g), alpha=args.noise_std)
                    t = W.to(getattr(torch, common._ST_TO_TORCH[meta["dtype"]])).contiguous()
                    assert t.numel() * t.element_size() == b1 - b0
                    dst.write(
                        t.view(torch.uint8).numpy().tobytes()
                        if t.dtype != torch.bfloat16
                        else t.view(torch.int16).numpy().tobytes()
                    )
                    del W, U, V, t
                    n_changed += 1
                else:
                    src.seek(data0 + b0)
                    left = b1 - b0
                    while left:
                        chunk = src.read(min(left, 64 << 20))
                        dst.write(chunk)
                        left -= len(chunk)
        print(f"[synthetic-ft] wrote {fp.name} ({time.perf_counter() - t0:.0f} s)", flush=True)
    _copy_side_files(base, out)
    info = {
        "delta_rank": r,
        "delta_std": args.delta_std,
        "noise_std": args.noise_std,
        "seed": args.seed,
        "changed": n_changed,
    }
    common._mark_done(out, info)
    print(f"[synthetic-ft] {n_changed} changed tensors in {time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="kind", required=True)
    a = sub.add_parser("smollm2")
    a.add_argument("base")
    a.add_argument("out")
    a.add_argument("--steps", type=int, default=10)
    a.add_argument("--lr", type=float, default=3e-5)
    a.add_argument("--batch", type=int, default=4)
    a.add_argument("--seq", type=int, default=128)
    a.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("synthetic")
    b.add_argument("base")
    b.add_argument("out")
    b.add_argument("--delta-rank", type=int, default=32)
    b.add_argument("--delta-std", type=float, default=2e-3)
    b.add_argument("--noise-std", type=float, default=2e-4)
    b.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    smollm2(args) if args.kind == "smollm2" else synthetic(args)


if __name__ == "__main__":
    main()
