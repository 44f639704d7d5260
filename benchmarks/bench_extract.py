#!/usr/bin/env python
"""Benchmark (issue 4): extract a LoRA from a full fine-tune — loracook vs mergekit-extract-lora.

Workloads (each fine-tune is made once by _make_finetunes.py and cached under benchmarks/.work/):
  smollm2    SmolLM2-135M-Instruct fp32 (``loracook.io.packaged.smollm2_folder()``) and a fine-tune of it: 10 full-rank
             AdamW steps on the 7 linear projections of every layer (embeddings and norms frozen), rank 64.
  synthetic  the synthetic 1.47B bf16 Llama of common.py and a fine-tune W + (random rank-32 delta) + noise on
             every linear projection, rank 64.

Contenders, each its own child process, whole process timed (start-up included):
  loracook   `loracook run RECIPE --force`, one source `ft: {extract: {model: FT, rank: 64}}`, output.kind
             adapter (dtype float32 for smollm2, bfloat16 for synthetic — the dtype mergekit writes there)
  mergekit   `mergekit-extract-lora --model FT --base-model BASE --out-path OUT --max-rank 64` (its defaults)

Variants, only with --only (what the time is made of):
  loracook-exact   the same recipe with `check: exact` (the optimal error from the float64 Gram spectrum)
  floor-nosvd      loracook with no SVD at all (start-up, reading, ΔW, writing): the floor of any extraction
  floor-plain1     loracook with plain subspace iteration, 1 power iteration, no check (_extract_variant.py)
  floor-plain2     the same with 2 power iterations

After the timed runs, _lora_eval.py compares each written adapter with the true ΔW = W_ft − W_base per module
(float64) and with the optimal rank-64 error from a full SVD of ΔW (cached in .work/extract-optimal.json).

Run from the repository root with the project venv active:
    python benchmarks/bench_extract.py --work all --repeat 2 --markdown /tmp/bench_extract.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import common  # noqa: E402
from common import WORK_DIR  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CONTENDERS = ["loracook", "mergekit"]
VARIANTS = ["loracook-exact", "floor-nosvd", "floor-plain1", "floor-plain2"]
WORKS = ["smollm2", "synthetic"]
RANK = 64
SPEED_TARGET = {"smollm2": 5.0, "synthetic": 10.0}


def smollm2_base() -> Path:
    code = "from loracook.io.packaged import smollm2_folder; print(smollm2_folder())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bu.env(), check=True)
    return Path(r.stdout.strip().splitlines()[-1])


def _make(kind: str, base: Path, out: Path, quiet: bool) -> None:
    if (out / ".complete").exists():
        return
    bu.wait_quiet(enabled=quiet, what=f"making the {kind} fine-tune")
    print(f"[setup] making the {kind} fine-tune -> {out}", flush=True)
    subprocess.run(
        [sys.executable, str(BENCH_DIR / "_make_finetunes.py"), kind, str(base), str(out)],
        env=bu.env(),
        check=True,
    )


def prepare(name: str, quiet: bool) -> dict:
    if name == "smollm2":
        base = smollm2_base()
        ft = WORK_DIR / "smollm2-135m-ft"
        label, dtype, svd_dtype = "SmolLM2-135M fp32", "float32", "float64"
        every = 1
    else:
        if not (WORK_DIR / "synthetic-llama-1.5b" / ".complete").exists():
            bu.wait_quiet(enabled=quiet, what="generating the synthetic model")
        base = common.ensure_synthetic_llama()
        ft = WORK_DIR / "synthetic-llama-1.5b-ft"
        label, dtype, svd_dtype = "synthetic Llama 1.47B bf16", "bfloat16", "float32"
        every = 7  # errors on layers 0, 7, 14, 21: a full SVD of each 2048 × 5632 delta takes ~10 s
    _make(name, base, ft, quiet)
    info = common.checkpoint_info(base)
    info.pop("shapes")
    d = WORK_DIR / "runs" / f"extract-{name}"
    d.mkdir(parents=True, exist_ok=True)
    return {
        "name": name,
        "label": label,
        "base": base,
        "ft": ft,
        "dtype": dtype,
        "svd_dtype": svd_dtype,
        "layers_every": every,
        "info": info,
        "dir": d,
        "ft_info": json.loads((ft / ".complete").read_text()),
    }


def command(w: dict, contender: str) -> tuple[list[str], Path, list[Path]]:
    out = w["dir"] / f"out-{contender}"
    if contender != "mergekit":
        check = "exact" if contender == "loracook-exact" else "estimate"
        recipe = w["dir"] / f"recipe-{contender}.yaml"
        recipe.write_text(
            "loracook: 1\n"
            f"name: bench-extract-{w['name']}\n"
            f"base: {w['base']}\n"
            "sources:\n"
            "  ft:\n"
            f"    extract: {{model: {w['ft']}, rank: {RANK}, check: {check}}}\n"
            "output:\n"
            "  kind: adapter\n"
            f"  path: {out}\n"
            f"  dtype: {w['dtype']}\n"
        )
        args = ["run", str(recipe), "--force"]
        if contender.startswith("floor-"):
            variant = str(BENCH_DIR / "_extract_variant.py")
            return [sys.executable, variant, contender.removeprefix("floor-"), *args], out, [out]
        return [bu.loracook_exe(), *args], out, [out]
    exe = bu.MERGEKIT_VENV / "bin" / "mergekit-extract-lora"
    cache = w["dir"] / "mergekit-cache"
    cmd = [
        str(exe),
        "--model",
        str(w["ft"]),
        "--base-model",
        str(w["base"]),
        "--out-path",
        str(out),
        "--max-rank",
        str(RANK),
        "--lora-merge-cache",
        str(cache),
    ]
    return cmd, out, [out, cache]


def adapter_file_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.rglob("adapter_model*.safetensors"))


def evaluate(w: dict, outs: dict[str, Path]) -> dict:
    spec = {
        "base": str(w["base"]),
        "ft": str(w["ft"]),
        "rank": RANK,
        "svd_dtype": w["svd_dtype"],
        "layers_every": w["layers_every"],
        "outputs": {k: str(v) for k, v in outs.items()},
        "optimal_cache": str(WORK_DIR / "extract-optimal.json"),
    }
    sp, res = w["dir"] / "eval-spec.json", w["dir"] / "eval-result.json"
    sp.write_text(json.dumps(spec, indent=1))
    subprocess.run(
        [sys.executable, str(BENCH_DIR / "_lora_eval.py"), "extract", str(sp), str(res)],
        env=bu.env(),
        check=True,
    )
    return json.loads(res.read_text())


def table(w: dict, summ: dict, ev: dict | None) -> str:
    cols = [
        "contender",
        "wall s (median)",
        "runs s",
        "CPU s",
        "peak RSS GiB",
        "peak RssAnon GiB",
        "kernel maxrss GiB",
        "adapter file MiB",
        "output folder MiB",
        "LoRA modules / full tensors",
        "rel. Frobenius error (aggregate)",
        "max module err / optimal",
    ]
    rows = []
    for c, s in summ.items():
        e = (ev or {}).get("outputs", {}).get(c, {})
        rows.append(
            [
                c,
                bu.sec(s.get("wall_s"))
                if s.get("ok") == s["runs"]
                else f"{bu.sec(s.get('wall_s'))} ({s['ok']}/{s['runs']} ok)",
                ", ".join(f"{x:.2f}" for x in s["walls"]),
                f"{s['cpu_s']:.1f}" if "cpu_s" in s else "—",
                bu.gib(s.get("peak_rss")),
                bu.gib(s.get("peak_anon")),
                bu.gib(s.get("maxrss")),
                bu.mib(s.get("adapter_bytes")),
                bu.mib(s.get("folder_bytes")),
                f"{e['lora_modules']} / {len(e['full_tensors'])}" if e else "—",
                f"{e['rel_fro_aggregate']:.6f}" if e else "—",
                f"{e['err_over_optimal_max']:.6f}" if e.get("err_over_optimal_max") is not None else "—",
            ]
        )
    if ev:
        rows.append(
            [
                f"optimal rank-{RANK} (full SVD of ΔW)",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                "",
                f"{ev['optimal']['rel_fro_aggregate']:.6f}",
                "1",
            ]
        )
    i = w["info"]
    head = (
        f"**{w['label']}** ({i['params'] / 1e6:.0f} M params, {i['bytes'] / bu.GiB:.2f} GiB in "
        f"{len(i['files'])} file(s); {ev['modules'] if ev else '?'} changed 2-D modules; rank {RANK})\n\n"
    )
    return head + bu.md_table(cols, rows)


def targets(w: dict, summ: dict, ev: dict | None) -> list[str]:
    out = []
    name = w["name"]
    lc, mk = summ.get("loracook", {}), summ.get("mergekit", {})
    if "wall_s" in lc and "wall_s" in mk:
        sp = mk["wall_s"] / lc["wall_s"]
        t = SPEED_TARGET[name]
        out.append(
            f"- {name}: mergekit / loracook wall = {sp:.1f}× (target ≥ {t:g}×): {'met' if sp >= t else 'MISSED'}"
            f"; CPU time ratio {mk['cpu_s'] / lc['cpu_s']:.1f}×"
        )
    if ev and "pairwise" in ev:
        p = ev["pairwise"]
        a = ev["outputs"]["loracook"]["rel_fro_aggregate"]
        b = ev["outputs"]["mergekit"]["rel_fro_aggregate"]
        ok = p["max_ratio"] is not None and p["max_ratio"] <= 1.01
        out.append(
            f"- {name}: error per module loracook / mergekit: max {p['max_ratio']:.6f} (target ≤ 1.01): "
            f"{'met' if ok else 'MISSED'}; aggregate {a:.6f} vs {b:.6f}; worst modules {p['worst'][:3]}"
        )
    if lc.get("adapter_bytes") and mk.get("adapter_bytes"):
        ok = lc["adapter_bytes"] <= mk["adapter_bytes"]
        out.append(
            f"- {name}: adapter file {bu.mib(lc['adapter_bytes'])} MiB vs mergekit {bu.mib(mk['adapter_bytes'])} MiB "
            f"(target: no larger): {'met' if ok else 'MISSED'}"
        )
    if "peak_anon" in lc:
        out.append(
            f"- {name}: loracook peak RssAnon {bu.gib(lc['peak_anon'])} GiB, peak RSS {bu.gib(lc['peak_rss'])} GiB "
            f"(model {bu.gib(w['info']['bytes'])} GiB, largest tensor {bu.gib(w['info']['largest_tensor_bytes'])} GiB)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", choices=WORKS + ["all"], default="all")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine (smoke tests)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args(argv)
    contenders = bu.parse_contenders(ap, args.only, CONTENDERS + VARIANTS)
    quiet = not args.no_wait
    works = WORKS if args.work == "all" else [args.work]
    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    prepared = {name: prepare(name, quiet) for name in works}
    vers = bu.versions()
    print("[versions] " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    baseline = bu.measure_baseline(2, logs, quiet)
    md, checks, all_results = [], [], {}
    for name in works:
        w = prepared[name]
        print(f"\n[{name}] base {w['base']}\n          ft   {w['ft']} {w['ft_info']}", flush=True)
        runs: dict[str, list] = {c: [] for c in contenders}
        sizes: dict[str, tuple[int, int]] = {}
        for rep in range(args.repeat):
            for c in contenders:
                cmd, out, wipe = command(w, c)
                m = bu.measure(
                    f"{name} {c} run {rep + 1}",
                    cmd,
                    wipe=wipe,
                    warm=[w["base"], w["ft"]],
                    log=logs / f"extract-{name}-{c}-{rep}.log",
                    cwd=w["dir"],
                    quiet=quiet,
                )
                if m.ok:
                    sizes[c] = (adapter_file_bytes(out), bu.dir_bytes(out))
                runs[c].append(m)
        summ = {}
        for c, ms in runs.items():
            s = bu.summarize_runs(ms)
            if c in sizes:
                s["adapter_bytes"], s["folder_bytes"] = sizes[c]
            summ[c] = s
        ev = None
        if not args.no_eval:
            outs = {c: command(w, c)[1] for c in contenders if summ[c].get("ok") and c != "floor-nosvd"}
            if outs:
                ev = evaluate(w, outs)
        md.append(table(w, summ, ev))
        checks += targets(w, summ, ev)
        all_results[name] = {
            "base": str(w["base"]),
            "ft": str(w["ft"]),
            "ft_info": w["ft_info"],
            "info": w["info"],
            "summary": summ,
            "eval": {k: v for k, v in (ev or {}).items() if k != "ref_norms"},
            "raw": {c: [m.__dict__ | {"log": m.log[-3000:]} for m in ms] for c, ms in runs.items()},
        }
        shutil.rmtree(w["dir"] / "mergekit-cache", ignore_errors=True)
        if not args.keep_outputs:
            for c in contenders:
                shutil.rmtree(command(w, c)[1], ignore_errors=True)

    text = "\n\n".join(md)
    text += (
        f'\n\nBaseline `python -c "import torch"`: {bu.sec(baseline.get("wall_s"))} s, peak RSS '
        f"{bu.gib(baseline.get('peak_rss'))} GiB, RssAnon {bu.gib(baseline.get('peak_anon'))} GiB.\n\n"
        "Targets:\n" + "\n".join(checks)
    )
    bu.save_results("extract", text, all_results, vers, baseline, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
