#!/usr/bin/env python
"""Benchmark (issue 3): combine N rank-16 LoRAs into one adapter — loracook vs PEFT add_weighted_adapter.

Workload: SmolLM2-135M-Instruct (fp32 folder from ``loracook.io.packaged.smollm2_folder()``) and N random rank-16
PEFT adapters (alpha 32, q,k,v,o,gate,up,down, nonzero lora_B, seeds 101..100+N), N = 2 and 8, with fixed
distinct weights. Contenders, each its own child process:

  loracook-svd     `loracook run RECIPE --force` (through _loracook_timed.py, which also times the command
                   apart from the imports), merge.method svd, rank 16, output.kind adapter
  peft-svd         _peft_weighted.py: from_pretrained + PeftModel/load_adapter ×N +
                   add_weighted_adapter(combination_type="svd", svd_rank=16) + save_pretrained
  loracook-linear  `loracook run`, merge.method linear (exact, rank Σ r_i = 16·N), output.kind adapter
  peft-linear      add_weighted_adapter(combination_type="linear") (factor space, rank 16, cross terms)

After the timed runs, _lora_eval.py compares every output with the exact Σ w_i ΔW_i (float64, from the raw
adapter tensors) and with the optimal rank-16 error (full SVD of that sum).

Run from the repository root with the project venv active:
    python benchmarks/bench_adapters.py --n 2,8 --repeat 2 --markdown /tmp/bench_adapters.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_util as bu  # noqa: E402
import common  # noqa: E402
from common import WORK_DIR  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
CONTENDERS = ["loracook-svd", "peft-svd", "loracook-linear", "peft-linear", "base-svd", "base-linear"]
BASELINE: dict[str, Path] = {}  # "root": the source tree of --baseline REF, for the base-* contenders
WEIGHTS = [0.9, 0.5, 0.7, 0.3, 0.8, 0.4, 0.6, 0.2]  # first N are used
RANK = 16
SEED0 = 100


def smollm2_base() -> Path:
    code = "from loracook.io.packaged import smollm2_folder; print(smollm2_folder())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=bu.env(), check=True)
    return Path(r.stdout.strip().splitlines()[-1])


def prepare(n: int, base: Path) -> dict:
    adapters = []
    for i in range(n):
        seed = SEED0 + 1 + i
        out = WORK_DIR / "adapters" / f"smollm2-r16-s{seed}"
        fresh = not (out / ".complete").exists()
        common.ensure_lora_adapter(base, out, r=RANK, alpha=32, seed=seed)
        if fresh:
            common.check_peft_loads(base, out)
        adapters.append(out)
    d = WORK_DIR / "runs" / f"adapters-n{n}"
    d.mkdir(parents=True, exist_ok=True)
    return {"n": n, "base": base, "adapters": adapters, "weights": WEIGHTS[:n], "dir": d}


def _recipe(w: dict, method: str, rank: int | None, out: Path) -> Path:
    lines = ["loracook: 1", f"name: bench-{method}-n{w['n']}", f"base: {w['base']}", "sources:"]
    lines += [f"  a{i}: {p}" for i, p in enumerate(w["adapters"])]
    lines += ["merge:", f"  method: {method}"]
    lines += ["  weights: {" + ", ".join(f"a{i}: {x}" for i, x in enumerate(w["weights"])) + "}"]
    if rank:
        lines.append(f"  rank: {rank}")
    lines += ["output:", "  kind: adapter", f"  path: {out}"]
    path = w["dir"] / f"recipe-{method}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def command(w: dict, contender: str) -> tuple[list[str], Path]:
    tool, method = contender.split("-")
    out = w["dir"] / f"out-{contender}"
    if tool in ("loracook", "base"):  # base: the --baseline commit's loracook on the same recipe
        recipe = _recipe(w, method, RANK if method == "svd" else None, out)
        root = ["--code-root", str(BASELINE["root"])] if tool == "base" else []
        return [
            sys.executable,
            str(BENCH_DIR / "_loracook_timed.py"),
            *root,
            "run",
            str(recipe),
            "--force",
        ], out
    rank = str(RANK) if method == "svd" else "none"
    pairs = [f"{p}:{x}" for p, x in zip(w["adapters"], w["weights"])]
    cmd = [
        sys.executable,
        str(BENCH_DIR / "_peft_weighted.py"),
        str(w["base"]),
        str(out),
        method,
        rank,
        *pairs,
    ]
    return cmd, out


def phase_times(log: str) -> dict | None:
    """The PEFT_TIMES / LORACOOK_TIMES line of a contender's log, with ``op_s``: the operation alone (PEFT's
    add_weighted_adapter call; loracook's whole command after start-up, reading and writing included)."""
    m = re.search(r"^(PEFT|LORACOOK)_TIMES (\{.*\})$", log, re.M)
    if not m:
        return None
    times = json.loads(m.group(2))
    times["op_s"] = times.get("add_weighted_adapter_s", times.get("run_s"))
    return times


def evaluate(w: dict, outs: dict[str, Path]) -> dict:
    spec = {
        "adapters": [str(p) for p in w["adapters"]],
        "weights": w["weights"],
        "rank": RANK,
        "outputs": {k: str(v) for k, v in outs.items()},
    }
    sp = w["dir"] / "eval-spec.json"
    res = w["dir"] / "eval-result.json"
    sp.write_text(json.dumps(spec, indent=1))
    subprocess.run(
        [sys.executable, str(BENCH_DIR / "_lora_eval.py"), "sum", str(sp), str(res)], env=bu.env(), check=True
    )
    return json.loads(res.read_text())


def table(n: int, summ: dict, ev: dict | None, baseline: dict) -> str:
    cols = [
        "contender",
        "wall s (median)",
        "runs s",
        "operation s",
        "CPU s",
        "peak RSS GiB",
        "peak RssAnon GiB",
        "out rank",
        "rel. Frobenius error vs exact Σ",
        "max module err / optimal",
    ]
    rows = []
    for c, s in summ.items():
        e = (ev or {}).get("outputs", {}).get(c, {})
        op = s.get("op_s")
        rows.append(
            [
                c,
                bu.sec(s.get("wall_s"))
                if s.get("ok") == s["runs"]
                else f"{bu.sec(s.get('wall_s'))} ({s['ok']}/{s['runs']} ok)",
                ", ".join(f"{x:.2f}" for x in s["walls"]),
                bu.sec(op) if op is not None else "—",
                f"{s['cpu_s']:.1f}" if "cpu_s" in s else "—",
                bu.gib(s.get("peak_rss")),
                bu.gib(s.get("peak_anon")),
                "/".join(map(str, e.get("ranks", []))) or "—",
                f"{e['rel_fro_aggregate']:.3e}" if e else "—",
                f"{e['err_over_optimal_max']:.6f}" if e.get("err_over_optimal_max") is not None else "—",
            ]
        )
    if ev:
        o = ev["optimal"]
        rows.append(
            [
                "optimal rank-16 (full SVD of the exact Σ)",
                "",
                "",
                "",
                "",
                "",
                "",
                str(RANK),
                f"{o['rel_fro_aggregate']:.3e}",
                "1",
            ]
        )
    text = f"**N = {n} adapters** (weights {WEIGHTS[:n]}; {ev['modules'] if ev else '?'} modules)\n\n"
    return text + bu.md_table(cols, rows)


def targets(n: int, summ: dict, ev: dict | None) -> list[str]:
    out = []
    lc, pe = summ.get("loracook-svd", {}), summ.get("peft-svd", {})
    if "wall_s" in lc and "wall_s" in pe:
        sp = pe["wall_s"] / lc["wall_s"]
        out.append(f"- N={n}: whole process, PEFT svd / loracook svd wall = {sp:.1f}×")
    if lc.get("op_s") and pe.get("op_s"):
        sp = pe["op_s"] / lc["op_s"]
        out.append(
            f"- N={n}: the operation, PEFT add_weighted_adapter(svd) {pe['op_s']:.2f} s / loracook run "
            f"(plan, read, merge, write) {lc['op_s']:.2f} s = {sp:.1f}× (target ≥ 20×): {'met' if sp >= 20 else 'MISSED'}"
        )
    if ev and "loracook-svd" in ev["outputs"] and "peft-svd" in ev["outputs"]:
        a = ev["outputs"]["loracook-svd"]["rel_fro_aggregate"]
        b = ev["outputs"]["peft-svd"]["rel_fro_aggregate"]
        worst = ev["outputs"]["loracook-svd"]["err_over_optimal_max"]
        ok = a <= b * (1 + 1e-6)
        out.append(
            f"- N={n}: error loracook svd {a:.6e} vs PEFT svd {b:.6e} (ratio {a / b:.6f}; "
            f"worst module / optimal {worst:.6f}): {'equal or lower' if ok else 'HIGHER'}"
        )
    if ev and "peft-linear" in ev["outputs"]:
        pl = ev["outputs"]["peft-linear"]["rel_fro_aggregate"]
        ll = ev["outputs"].get("loracook-linear", {}).get("rel_fro_aggregate")
        out.append(
            f"- N={n}: linear: PEFT factor-space error {pl:.3e} (cross terms), loracook exact "
            + (f"{ll:.3e}" if ll is not None else "—")
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="2,8", help="comma-separated adapter counts (default 2,8)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", default=",".join(CONTENDERS))
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine (smoke tests)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--baseline", metavar="REF", help="also run this commit's loracook (contenders base-*)")
    args = ap.parse_args(argv)
    contenders = bu.parse_contenders(ap, args.only, CONTENDERS)
    if args.baseline:
        BASELINE["root"] = bu.code_root(args.baseline)
    elif any(c.startswith("base-") for c in contenders):
        contenders = [c for c in contenders if not c.startswith("base-")]
    quiet = not args.no_wait
    logs = WORK_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    base = smollm2_base()
    works = [prepare(int(x), base) for x in args.n.split(",")]
    vers = bu.versions()
    print("[versions] " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    print(f"[base] {base}", flush=True)
    baseline = bu.measure_baseline(2, logs, quiet)

    all_results = {}
    md = []
    checks = []
    for w in works:
        n = w["n"]
        print(f"\n[N={n}] adapters {[p.name for p in w['adapters']]}, weights {w['weights']}", flush=True)
        runs: dict[str, list] = {c: [] for c in contenders}
        for rep in range(args.repeat):
            for c in contenders:
                cmd, out = command(w, c)
                m = bu.measure(
                    f"N={n} {c} run {rep + 1}",
                    cmd,
                    wipe=[out],
                    warm=[w["base"], *w["adapters"]],
                    log=logs / f"adapters-n{n}-{c}-{rep}.log",
                    cwd=w["dir"],
                    quiet=quiet,
                )
                pt = phase_times(m.log)
                if pt:
                    m.extra["phases"] = pt
                    print(f"    phases: {json.dumps({k: round(v, 2) for k, v in pt.items()})}", flush=True)
                runs[c].append(m)
        summ = {}
        for c, ms in runs.items():
            s = bu.summarize_runs(ms)
            ops = sorted(m.extra["phases"]["op_s"] for m in ms if m.ok and "phases" in m.extra)
            if ops:
                s["op_s"] = (
                    ops[len(ops) // 2]
                    if len(ops) % 2
                    else sum(ops[len(ops) // 2 - 1 : len(ops) // 2 + 1]) / 2
                )
                s["phases"] = [m.extra["phases"] for m in ms if "phases" in m.extra]
            summ[c] = s
        ev = None
        if not args.no_eval:
            outs = {c: command(w, c)[1] for c in contenders if summ[c].get("ok")}
            if outs:
                ev = evaluate(w, outs)
        md.append(table(n, summ, ev, baseline))
        checks += targets(n, summ, ev)
        all_results[f"n{n}"] = {
            "weights": w["weights"],
            "adapters": [str(p) for p in w["adapters"]],
            "summary": summ,
            "eval": {k: v for k, v in (ev or {}).items() if k not in ("ref_norms",)},
            "raw": {c: [m.__dict__ | {"log": m.log[-2000:]} for m in ms] for c, ms in runs.items()},
        }

    text = "\n\n".join(md)
    text += (
        f'\n\nBaseline `python -c "import torch"`: {bu.sec(baseline.get("wall_s"))} s, peak RSS '
        f"{bu.gib(baseline.get('peak_rss'))} GiB.\n\nTargets:\n" + "\n".join(checks)
    )
    bu.save_results("adapters", text, all_results, vers, baseline, args.json, args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
