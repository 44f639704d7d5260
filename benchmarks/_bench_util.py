"""Helpers shared by bench_adapters.py and bench_extract.py (harness side: no torch import here).

- ``wait_quiet``: before a timed run (or heavy setup), wait until no ``bench_merge`` process runs and the
  1-minute load average is below a threshold, polling every 20 s.
- ``measure``: one timed child run through ``common.run_measured`` after the wait, a ``sync`` and a warm
  page cache.
- small formatting helpers for the markdown tables.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import WORK_DIR, GiB  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
MERGEKIT_VENV = BENCH_DIR / ".venv-mergekit"
MiB = 1024**2


def env(**extra) -> dict:
    out = dict(os.environ)
    out.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(WORK_DIR / "hf-home"),
        TOKENIZERS_PARALLELISM="false",
    )
    out.update(extra)
    return out


def _other_bench_running() -> list[str]:
    """Command lines of running ``bench_merge`` processes (the other benchmark), not counting this one."""
    r = subprocess.run(["pgrep", "-af", "bench_merge"], capture_output=True, text=True)
    me = os.getpid()
    return [ln for ln in r.stdout.splitlines() if ln.strip() and int(ln.split()[0]) != me]


def wait_quiet(max_load: float = 1.0, poll: float = 20.0, enabled: bool = True, what: str = "") -> float:
    """Block until no bench_merge process runs and the 1-min load average is < ``max_load``.

    Polls every ``poll`` seconds (no limit). Returns the seconds waited."""
    if not enabled:
        return 0.0
    t0 = time.monotonic()
    said = False
    while True:
        others = _other_bench_running()
        load1 = os.getloadavg()[0]
        if not others and load1 < max_load:
            break
        if not said:
            why = "bench_merge running" if others else f"load average {load1:.2f} ≥ {max_load}"
            print(f"    (waiting for a quiet machine{' before ' + what if what else ''}: {why})", flush=True)
            said = True
        time.sleep(poll)
    waited = time.monotonic() - t0
    if said:
        print(f"    (quiet after {waited:.0f} s, load {os.getloadavg()[0]:.2f})", flush=True)
    return waited


# Runs the loracook source tree given as the first argument instead of the installed one (the editable
# install's finder is removed), so an earlier commit can be measured side by side with the working tree.
_AT_ROOT = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
    "sys.path.insert(0, sys.argv.pop(1)); from loracook.cli import main; sys.exit(main(sys.argv[1:]))"
)


def code_root(ref: str) -> Path:
    """A git worktree of ``ref`` (a commit, tag or branch) under the benchmarks' work folder."""
    repo = Path(__file__).resolve().parents[1]
    sha = subprocess.run(
        ["git", "rev-parse", "--verify", f"{ref}^{{commit}}"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    root = WORK_DIR / f"loracook-{sha[:12]}"
    if not (root / "loracook").is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(root), sha], cwd=repo, check=True)
    return root


def loracook_at(root: Path) -> list[str]:
    """The command prefix that runs loracook's CLI from the source tree ``root``."""
    return [sys.executable, "-c", _AT_ROOT, str(root)]


def loracook_exe() -> str:
    cand = Path(sys.executable).parent / "loracook"
    if cand.exists():
        return str(cand)
    found = shutil.which("loracook")
    if not found:
        raise FileNotFoundError("loracook console script not found (install the project into this venv)")
    return found


def measure(
    name: str,
    cmd: list[str],
    *,
    wipe: list[Path],
    warm: list[Path],
    log: Path,
    cwd: Path | None = None,
    quiet: bool = True,
    timeout: float | None = None,
    max_other: float = 0.3,
    attempts: int = 3,
) -> common.Measurement:
    """Delete ``wipe``, sync, warm the page cache, wait for a quiet machine, then run and measure ``cmd``.

    When other processes used more than ``max_other`` cores on average during the run (and waiting is on),
    the run is repeated, up to ``attempts`` times in all; the least disturbed one is kept and the walls of the
    discarded ones are recorded in ``extra["discarded"]``."""
    tries: list[common.Measurement] = []
    for attempt in range(attempts if quiet else 1):
        for d in wipe:
            shutil.rmtree(d, ignore_errors=True)
        common.sync_disks()
        common.warm_page_cache(warm)
        wait_quiet(enabled=quiet, what=name)
        load_before = os.getloadavg()[0]
        m = common.run_measured(cmd, env=env(), cwd=cwd, log_path=log, timeout=timeout)
        m.extra["load1_before"] = load_before
        tries.append(m)
        if not m.ok or m.other_cores <= max_other:
            break
        if attempt + 1 < attempts:
            print(
                f"  {name:32s} {m.wall_s:7.2f} s  disturbed (others {m.other_cores:.2f} cores): again",
                flush=True,
            )
    m = min(tries, key=lambda t: (not t.ok, t.other_cores))
    m.extra["discarded"] = [
        {"wall_s": round(t.wall_s, 2), "other_cores": round(t.other_cores, 2)} for t in tries if t is not m
    ]
    status = "ok" if m.ok else f"FAILED (exit {m.returncode}, log {log})"
    print(
        f"  {name:32s} {m.wall_s:7.2f} s  RSS {m.peak_rss / GiB:5.2f} GiB  RssAnon {m.peak_anon / GiB:5.2f} GiB"
        f"  maxrss {m.maxrss / GiB:5.2f} GiB  CPU {m.cpu_s:6.1f} s  others {m.other_cores:.2f} cores"
        f"  load1 {load_before:.2f}  {status}",
        flush=True,
    )
    if not m.ok:
        tail = "\n".join(m.log.strip().splitlines()[-20:])
        print("    " + tail.replace("\n", "\n    "), flush=True)
    return m


def summarize_runs(runs: list[common.Measurement]) -> dict:
    ok = [m for m in runs if m.ok]
    out = {"runs": len(runs), "ok": len(ok), "walls": [round(m.wall_s, 2) for m in runs]}
    if ok:
        out.update(
            wall_s=statistics.median(m.wall_s for m in ok),
            cpu_s=statistics.median(m.cpu_s for m in ok),
            peak_rss=max(m.peak_rss for m in ok),
            peak_anon=max(m.peak_anon for m in ok),
            maxrss=max(m.maxrss for m in ok),
            other_cores=max(m.other_cores for m in runs),
            load1_before=max(m.extra.get("load1_before", 0.0) for m in runs),
        )
    return out


def measure_baseline(repeat: int, logs: Path, quiet: bool) -> dict:
    runs = [
        measure(
            f"baseline import torch #{i + 1}",
            [sys.executable, "-c", "import torch"],
            wipe=[],
            warm=[],
            log=logs / f"baseline-{i}.log",
            quiet=quiet,
        )
        for i in range(repeat)
    ]
    return summarize_runs(runs)


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "mem_gib": round(mem / GiB, 1),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def versions(extra_pkgs: tuple[str, ...] = ()) -> dict:
    from importlib import metadata

    out = {}
    for pkg in ("loracook", "torch", "transformers", "peft", "safetensors", *extra_pkgs):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    py = MERGEKIT_VENV / "bin" / "python"
    if py.exists():
        r = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
            capture_output=True,
            text=True,
        )
        out["mergekit"] = r.stdout.strip() or None
    repo = BENCH_DIR.parent
    r = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    if r.returncode == 0:
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--", "loracook"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        out["loracook_commit"] = r.stdout.strip() + ("-dirty" if dirty else "")
    return out


def gib(x) -> str:
    return "—" if x is None else f"{x / GiB:.2f}"


def mib(x) -> str:
    return "—" if x is None else f"{x / MiB:.1f}"


def sec(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def md_table(cols: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join(["---"] * len(cols)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parse_contenders(ap, only: str, choices: list[str]) -> list[str]:
    """The ``--only`` list, checked against ``choices`` (an argparse error names the unknown ones)."""
    contenders = [c.strip() for c in only.split(",") if c.strip()]
    bad = [c for c in contenders if c not in choices]
    if bad:
        ap.error(f"unknown contender(s) {bad}; choose from {choices}")
    return contenders


def save_results(
    kind: str, text: str, results: dict, versions: dict, baseline: dict, json_path, markdown_path
) -> None:
    """Print ``text``, write the raw results (with the machine facts) as JSON and, if asked, the markdown."""
    print("\n" + text + "\n")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    meta = {
        "when": stamp,
        "argv": sys.argv,
        "versions": versions,
        "machine": machine(),
        "baseline": baseline,
        "loadavg_end": os.getloadavg(),
    }
    path = json_path or WORK_DIR / f"{kind}-results-{stamp}.json"
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    print(f"[json] {path}")
    if markdown_path:
        markdown_path.write_text(text + "\n")
        print(f"[markdown] {markdown_path}")
