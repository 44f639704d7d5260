#!/usr/bin/env python
"""Benchmark: merge a rank-16 LoRA adapter into a base model and write the full model.

Contenders (each one its own child process, same inputs, same page-cache state):
  loracook  `loracook run RECIPE --force` (recipe: linear merge, weight 1.0, output kind model, dtype auto)
  mergekit  `mergekit-yaml` passthrough of `BASE+ADAPTER` (its model+lora input), in benchmarks/.venv-mergekit
  peft      from_pretrained + PeftModel.from_pretrained + merge_and_unload + save_pretrained
  io_floor  plain safetensors read of every tensor + save_file of every shard (the least any tool must do)

Memory: VmRSS and RssAnon of the child's process tree, sampled every 20 ms; plus the kernel's peak RSS of
the child (ru_maxrss from wait4). Baseline: `python -c "import torch"`.

Run from the repository root with the project venv active:
    python benchmarks/bench_merge.py --work all --repeat 2 --verify --markdown /tmp/bench.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import common  # noqa: E402
from common import WORK_DIR, GiB  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CONTENDERS = ["loracook", "loracook-base", "mergekit", "peft", "io_floor"]
BASELINE: dict[str, Path] = {}  # "root": the source tree of --baseline REF, for the loracook-base contender
WORKS = ["smollm2", "synthetic"]
MERGEKIT_VENV = BENCH_DIR / ".venv-mergekit"


# --------------------------------------------------------------------------------------------------
# workloads
# --------------------------------------------------------------------------------------------------


def prepare_work(name: str) -> dict:
    if name == "smollm2":
        base = common.ensure_smollm2()
        label = "SmolLM2-135M fp32"
    elif name == "synthetic":
        base = common.ensure_synthetic_llama()
        label = "synthetic Llama 1.5B bf16"
    else:
        raise ValueError(name)
    adapter = WORK_DIR / f"{name}-lora-r16"
    fresh = not (adapter / ".complete").exists()
    common.ensure_lora_adapter(base, adapter)
    if fresh:
        common.check_peft_loads(base, adapter)
    info = common.checkpoint_info(base)
    info.pop("shapes")
    return {
        "name": name,
        "label": label,
        "base": base,
        "adapter": adapter,
        "info": info,
        "dir": WORK_DIR / "runs" / name,
    }


# --------------------------------------------------------------------------------------------------
# contenders: each returns (cmd, env, out_dir, dirs to remove before a run)
# --------------------------------------------------------------------------------------------------


def _bytes_per(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def cmd_loracook_base(w: dict) -> tuple[list[str], dict, Path, list[Path]]:
    """The same recipe run by the --baseline commit's loracook (output in its own folder)."""
    cmd, env, out, _ = cmd_loracook(w)
    recipe = Path(cmd[2])
    base_out = w["dir"] / "out-loracook-base"
    text = recipe.read_text().replace(f"path: {out}", f"path: {base_out}")
    base_recipe = w["dir"] / "recipe-base.yaml"
    base_recipe.write_text(text)
    return [*bu.loracook_at(BASELINE["root"]), "run", str(base_recipe), "--force"], env, base_out, [base_out]


def cmd_loracook(w: dict) -> tuple[list[str], dict, Path, list[Path]]:
    out = w["dir"] / "out-loracook"
    recipe = w["dir"] / "recipe.yaml"
    recipe.write_text(
        "loracook: 1\n"
        f"name: bench-{w['name']}\n"
        f"base: {w['base']}\n"
        "sources:\n"
        f"  a: {w['adapter']}\n"
        "merge:\n"
        "  method: linear\n"
        "  weights: {a: 1.0}\n"
        "output:\n"
        "  kind: model\n"
        f"  path: {out}\n"
        "  dtype: auto\n"
        "  shard_size: 2GB\n"
    )
    return [bu.loracook_exe(), "run", str(recipe), "--force"], bu.env(), out, [out]


def cmd_mergekit(w: dict) -> tuple[list[str], dict, Path, list[Path]]:
    out = w["dir"] / "out-mergekit"
    cache = w["dir"] / "mergekit-lora-cache"  # mergekit skips the merge if this holds a result: wiped per run
    cfg = w["dir"] / "mergekit.yml"
    dtype = w["info"]["dtype"]
    cfg.write_text(
        f"merge_method: passthrough\nmodels:\n  - model: {w['base']}+{w['adapter']}\ndtype: {dtype}\n"
    )
    exe = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    shard_params = 2_000_000_000 // _bytes_per(dtype)  # 2 GB shards, like the others
    cmd = [
        str(exe),
        str(cfg),
        str(out),
        "--lora-merge-cache",
        str(cache),
        "--lora-merge-dtype",
        dtype,
        "--no-copy-tokenizer",
        "--no-write-model-card",
        "--quiet",
        "--out-shard-size",
        str(shard_params),
    ]
    return cmd, bu.env(), out, [out, cache]


def cmd_peft(w: dict) -> tuple[list[str], dict, Path, list[Path]]:
    out = w["dir"] / "out-peft"
    cmd = [
        sys.executable,
        str(BENCH_DIR / "peft_merge.py"),
        str(w["base"]),
        str(w["adapter"]),
        str(out),
        w["info"]["dtype"],
        "2GB",
    ]
    return cmd, bu.env(), out, [out]


def cmd_io_floor(w: dict) -> tuple[list[str], dict, Path, list[Path]]:
    out = w["dir"] / "out-io_floor"
    return [sys.executable, str(BENCH_DIR / "io_floor.py"), str(w["base"]), str(out)], bu.env(), out, [out]


COMMANDS = {
    "loracook": cmd_loracook,
    "loracook-base": cmd_loracook_base,
    "mergekit": cmd_mergekit,
    "peft": cmd_peft,
    "io_floor": cmd_io_floor,
}


def available(contender: str) -> str | None:
    """None if the contender can run, else why not."""
    if contender == "loracook-base" and "root" not in BASELINE:
        return "no --baseline REF given"
    if contender == "mergekit" and not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
        return f"{MERGEKIT_VENV}/bin/mergekit-yaml missing (see benchmarks/README.md)"
    if contender == "loracook":
        try:
            exe = bu.loracook_exe()
        except FileNotFoundError as e:
            return str(e)
        r = subprocess.run([exe, "--help"], capture_output=True, text=True)
        if r.returncode != 0:
            return "`loracook --help` fails: " + (r.stderr.strip().splitlines() or ["?"])[-1]
    return None


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def measure_baseline(repeat: int, logs: Path) -> dict:
    runs = []
    for i in range(repeat):
        m = common.run_measured(
            [sys.executable, "-c", "import torch"], env=bu.env(), log_path=logs / f"baseline-{i}.log"
        )
        if not m.ok:
            raise RuntimeError("python -c 'import torch' failed:\n" + m.log)
        runs.append(m)
    return {
        "peak_rss": max(m.peak_rss for m in runs),
        "peak_anon": max(m.peak_anon for m in runs),
        "maxrss": max(m.maxrss for m in runs),
        "wall_s": statistics.median(m.wall_s for m in runs),
    }


def run_one(w: dict, contender: str, rep: int, logs: Path, wait_idle: float = 0.0) -> common.Measurement:
    cmd, env, out, wipe = COMMANDS[contender](w)
    for d in wipe:
        shutil.rmtree(d, ignore_errors=True)
    common.sync_disks()  # flush what the previous run wrote (and the deletions) outside the timed region
    common.warm_page_cache([w["base"], w["adapter"]])  # same warm-cache start for everyone
    if wait_idle > 0:
        common.wait_for_idle(wait_idle)
    log = logs / f"{w['name']}-{contender}-{rep}.log"
    m = common.run_measured(cmd, env=env, cwd=w["dir"], log_path=log)
    m.extra["out"] = str(out)
    status = "ok" if m.ok else f"FAILED (exit {m.returncode}, log {log})"
    print(
        f"  [{w['name']}] {contender:9s} run {rep + 1}: {m.wall_s:7.2f} s  "
        f"RSS {m.peak_rss / GiB:5.2f} GiB  RssAnon {m.peak_anon / GiB:5.2f} GiB  "
        f"maxrss {m.maxrss / GiB:5.2f} GiB  CPU {m.cpu_s:6.1f} s  others {m.other_cores:.2f} cores  {status}",
        flush=True,
    )
    if not m.ok:
        tail = "\n".join(m.log.strip().splitlines()[-15:])
        print("    " + tail.replace("\n", "\n    "), flush=True)
    return m


def summarize(results: dict, baseline: dict, works: dict) -> list[dict]:
    rows = []
    for wname, per in results.items():
        info = works[wname]["info"]
        floor = None
        if per.get("io_floor") and all(m.ok for m in per["io_floor"]):
            floor = statistics.median(m.wall_s for m in per["io_floor"])
        for contender, runs in per.items():
            ok = [m for m in runs if m.ok]
            row = {
                "work": wname,
                "label": works[wname]["label"],
                "contender": contender,
                "runs": len(runs),
                "ok": len(ok),
                "largest_tensor_bytes": info["largest_tensor_bytes"],
                "largest_tensor": info["largest_tensor"],
                "model_bytes": info["bytes"],
            }
            if ok:
                wall = statistics.median(m.wall_s for m in ok)
                peak_rss = max(m.peak_rss for m in ok)
                peak_anon = max(m.peak_anon for m in ok)
                row.update(
                    wall_s=wall,
                    walls=[round(m.wall_s, 2) for m in runs],
                    ratio_floor=(wall / floor) if floor else None,
                    cpu_s=statistics.median(m.cpu_s for m in ok),
                    other_cores=max(m.other_cores for m in runs),
                    peak_rss=peak_rss,
                    peak_anon=peak_anon,
                    maxrss=max(m.maxrss for m in ok),
                    extra_rss=peak_rss - baseline["peak_rss"],
                    extra_anon=peak_anon - baseline["peak_anon"],
                )
                row["extra_over_largest"] = row["extra_rss"] / info["largest_tensor_bytes"]
            rows.append(row)
    return rows


def _gb(x) -> str:
    return "—" if x is None else f"{x / GiB:.2f}"


def markdown_table(rows: list[dict], baseline: dict) -> str:
    cols = [
        "work",
        "contender",
        "wall s (median)",
        "× I/O floor",
        "CPU s (median)",
        "peak RSS GiB",
        "peak RssAnon GiB",
        "RSS − torch baseline GiB",
        "RssAnon − baseline GiB",
        "kernel maxrss GiB",
        "largest tensor GiB",
        "(RSS − baseline) / largest",
        "other load (cores)",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    for r in rows:
        if "wall_s" not in r:
            cells = [r["label"], r["contender"], f"failed ({r['ok']}/{r['runs']} ok)"] + ["—"] * 7
            cells += [_gb(r["largest_tensor_bytes"]), "—", "—"]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        ratio = "—" if r["ratio_floor"] is None else f"{r['ratio_floor']:.2f}"
        fail = "" if r["ok"] == r["runs"] else f" ({r['runs'] - r['ok']} failed)"
        cells = [
            r["label"],
            r["contender"] + fail,
            f"{r['wall_s']:.2f}",
            ratio,
            f"{r['cpu_s']:.1f}",
            _gb(r["peak_rss"]),
            _gb(r["peak_anon"]),
            _gb(r["extra_rss"]),
            _gb(r["extra_anon"]),
            _gb(r["maxrss"]),
            _gb(r["largest_tensor_bytes"]),
            f"{r['extra_over_largest']:.1f}×",
            f"{r['other_cores']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f'\nBaseline `python -c "import torch"`: peak RSS {_gb(baseline["peak_rss"])} GiB, '
        f"RssAnon {_gb(baseline['peak_anon'])} GiB, {baseline['wall_s']:.2f} s. "
        '"other load": the most CPU that other processes on the machine used during any run of that row.'
    )
    return "\n".join(lines)


def target_checks(rows: list[dict]) -> str:
    """The targets from the issue, evaluated for loracook on each workload."""
    out = []
    by = {(r["work"], r["contender"]): r for r in rows}
    for work in dict.fromkeys(r["work"] for r in rows):
        lc, mk = by.get((work, "loracook")), by.get((work, "mergekit"))
        if not lc or "wall_s" not in lc:
            out.append(f"- {work}: loracook did not produce a result")
            continue
        fl = by.get((work, "io_floor"))
        if lc.get("ratio_floor") is not None:
            ok = lc["ratio_floor"] <= 1.5
            cpu = f", CPU time ratio {lc['cpu_s'] / fl['cpu_s']:.2f}" if fl and fl.get("cpu_s") else ""
            out.append(
                f"- {work}: loracook wall / I/O floor = {lc['ratio_floor']:.2f} (target ≤ 1.5): "
                f"{'met' if ok else 'MISSED'}{cpu}"
            )
        if mk and "wall_s" in mk:
            sp = mk["wall_s"] / lc["wall_s"]
            out.append(
                f"- {work}: mergekit / loracook wall = {sp:.2f}× (target ≥ 3×): "
                f"{'met' if sp >= 3 else 'MISSED'}, CPU time ratio {mk['cpu_s'] / lc['cpu_s']:.2f}×"
            )
        ratio = lc["extra_over_largest"]
        out.append(
            f"- {work}: loracook peak RSS − baseline = {_gb(lc['extra_rss'])} GiB = {ratio:.1f}× the "
            f"largest tensor ({_gb(lc['largest_tensor_bytes'])} GiB) (target ≤ 3×): "
            f"{'met' if ratio <= 3 else 'MISSED'}; RssAnon − baseline = {_gb(lc['extra_anon'])} GiB = "
            f"{lc['extra_anon'] / lc['largest_tensor_bytes']:.1f}×"
        )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# correctness check
# --------------------------------------------------------------------------------------------------

VERIFY_CODE = r"""
import json, sys, re, os
import torch
from safetensors import safe_open

base, adapter, outs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def index(d):
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(idx):
        return {k: os.path.join(d, v) for k, v in json.load(open(idx))["weight_map"].items()}
    m = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(d, f), "pt") as h:
                m.update({k: os.path.join(d, f) for k in h.keys()})
    return m

def get(ix, k):
    with safe_open(ix[k], "pt") as h:
        return h.get_tensor(k)

cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
scale = cfg["lora_alpha"] / cfg["r"]
bix = index(base)
aix = index(adapter)
oix = {name: index(d) for name, d in outs.items()}
n_layers = 1 + max(int(m.group(1)) for k in bix for m in [re.search(r"layers\.(\d+)\.", k)] if m)
picks = [f"model.layers.0.self_attn.q_proj.weight", f"model.layers.{n_layers // 2}.self_attn.k_proj.weight",
         f"model.layers.{n_layers - 1}.mlp.down_proj.weight", "model.embed_tokens.weight"]
print(f"  output tensor sets: " + ", ".join(f"{n}: {len(ix)} tensors" for n, ix in oix.items())
      + f" (base: {len(bix)})")
for n, ix in oix.items():
    missing = sorted(set(bix) - set(ix))
    extra = sorted(set(ix) - set(bix))
    if missing or extra:
        print(f"  {n}: missing vs base {missing[:4]}{'...' if len(missing) > 4 else ''}, extra {extra[:4]}")
worst = {}
for k in picks:
    W = get(bix, k)
    mod = k[: -len(".weight")]
    ka = f"base_model.model.{mod}.lora_A.weight"
    if ka in aix:
        A = get(aix, ka).float()
        B = get(aix, f"base_model.model.{mod}.lora_B.weight").float()
        ref = W.float() + scale * (B @ A)
        delta = (ref - W.float()).abs().max().item()
    else:
        ref, delta = W.float(), 0.0
    ulp = (torch.finfo(W.dtype).eps * ref.abs().max()).item()  # one unit in the last place at the largest |w|
    parts = [f"  {k} [{W.dtype}, {tuple(W.shape)}]: max|ΔW| {delta:.3e}, ulp@max|W| {ulp:.1e}"]
    outs_t = {}
    for n, ix in oix.items():
        if k not in ix:
            parts.append(f"    {n}: (tensor absent)")
            continue
        t = get(ix, k)
        outs_t[n] = t
        d = (t.float() - ref).abs().max().item()
        worst[n] = max(worst.get(n, 0.0), d / max(ulp, 1e-30))
        parts.append(f"    {n:9s} dtype {str(t.dtype):14s} max|out − fp32 ref| {d:.3e}")
    if "loracook" in outs_t and "peft" in outs_t:
        d = (outs_t["loracook"].float() - outs_t["peft"].float()).abs().max().item()
        parts.append(f"    loracook vs peft: max-abs diff {d:.3e}")
    print("\n".join(parts))
print("  worst error vs fp32 reference, in ulps at max|W|: "
      + ", ".join(f"{n} {v:.2f}" for n, v in worst.items()))
"""


def verify(w: dict, contenders: list[str]) -> None:
    outs = {}
    for c in ("loracook", "peft", "mergekit"):
        d = w["dir"] / f"out-{c}"
        if c not in contenders:
            continue
        if d.exists() and any(d.glob("*.safetensors")):
            outs[c] = str(d)
    print(
        f"\n[verify] {w['label']}: outputs of the last runs vs an fp32 reference W + (alpha/r)·B·A",
        flush=True,
    )
    if not outs:
        print("  no outputs to check")
        return
    subprocess.run(
        [sys.executable, "-c", VERIFY_CODE, str(w["base"]), str(w["adapter"]), json.dumps(outs)],
        env=bu.env(),
        check=False,
    )


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", choices=WORKS + ["all"], default="all")
    ap.add_argument("--repeat", type=int, default=2, help="runs per contender (median wall time reported)")
    ap.add_argument(
        "--only", default=",".join(CONTENDERS), help=f"comma-separated subset of {','.join(CONTENDERS)}"
    )
    ap.add_argument("--markdown", type=Path, help="also write the result table to this file")
    ap.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to SECONDS until other processes use < 0.3 cores (shared machines)",
    )
    ap.add_argument(
        "--json",
        type=Path,
        help="write raw measurements as JSON here (default: benchmarks/.work/results-<time>.json)",
    )
    ap.add_argument(
        "--verify",
        action="store_true",
        help="after the runs, compare loracook / PEFT / mergekit outputs to an fp32 reference",
    )
    ap.add_argument(
        "--keep-outputs", action="store_true", help="keep merged models under benchmarks/.work/runs"
    )
    ap.add_argument(
        "--baseline", metavar="REF", help="also run this commit's loracook (contender loracook-base)"
    )
    args = ap.parse_args(argv)

    contenders = bu.parse_contenders(ap, args.only, CONTENDERS)
    if args.baseline:
        BASELINE["root"] = bu.code_root(args.baseline)
    works = WORKS if args.work == "all" else [args.work]

    skip = {}
    for c in contenders:
        why = available(c)
        if why:
            skip[c] = why
            print(f"[skip] {c}: {why}", flush=True)
    contenders = [c for c in contenders if c not in skip]
    if not contenders:
        print("nothing to run")
        return 2

    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    prepared = {}
    for name in works:
        prepared[name] = w = prepare_work(name)
        w["dir"].mkdir(parents=True, exist_ok=True)
        i = w["info"]
        print(
            f"[work] {w['label']}: {i['params'] / 1e6:.0f} M params, {i['bytes'] / GiB:.2f} GiB in "
            f"{len(i['files'])} file(s), largest tensor {i['largest_tensor']} "
            f"{i['largest_tensor_bytes'] / GiB:.3f} GiB",
            flush=True,
        )

    vers = bu.versions()
    print("[versions] " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    busy = common.busy_cores(1.0)
    if busy > 0.3:
        print(
            f"[warning] other processes keep {busy:.1f} of {os.cpu_count()} cores busy: wall times will be "
            "inflated (see the CPU s and other load columns; --wait-idle SECONDS waits for a quiet machine)",
            flush=True,
        )
    baseline = measure_baseline(max(args.repeat, 2), logs)
    print(
        f"[baseline] python -c 'import torch': RSS {baseline['peak_rss'] / GiB:.2f} GiB, "
        f"RssAnon {baseline['peak_anon'] / GiB:.2f} GiB",
        flush=True,
    )

    results: dict[str, dict[str, list[common.Measurement]]] = {}
    for name in works:
        w = prepared[name]
        results[name] = {c: [] for c in contenders}
        # round-robin over contenders so slow drift (thermal, page cache) hits everyone alike
        for rep in range(args.repeat):
            for c in contenders:
                results[name][c].append(run_one(w, c, rep, logs, args.wait_idle))
        if args.verify:
            verify(w, contenders)
        if not args.keep_outputs:
            for c in contenders:
                for d in COMMANDS[c](w)[3]:
                    shutil.rmtree(d, ignore_errors=True)

    rows = summarize(results, baseline, prepared)
    table = markdown_table(rows, baseline)
    checks = target_checks(rows) if "loracook" in contenders else ""
    print("\n" + table + "\n")
    if checks:
        print("Targets (loracook):\n" + checks + "\n")
    if skip:
        print("Skipped: " + "; ".join(f"{k}: {v}" for k, v in skip.items()))

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "when": stamp,
        "loadavg_end": os.getloadavg(),
        "versions": vers,
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "repeat": args.repeat,
        "baseline": baseline,
        "skipped": skip,
        "works": {
            k: {**v["info"], "base": str(v["base"]), "adapter": str(v["adapter"])}
            for k, v in prepared.items()
        },
    }
    raw = {
        k: {c: [{**m.__dict__, "log": None} for m in runs] for c, runs in per.items()}
        for k, per in results.items()
    }
    json_path = args.json or (WORK_DIR / f"results-{stamp}.json")
    json_path.write_text(json.dumps({"meta": meta, "rows": rows, "raw": raw}, indent=1, default=str))
    print(f"raw results: {json_path}")
    if args.markdown:
        args.markdown.write_text(table + ("\n\nTargets (loracook):\n" + checks if checks else "") + "\n")
        print(f"table written to {args.markdown}")
    failed = any(not m.ok for per in results.values() for runs in per.values() for m in runs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
