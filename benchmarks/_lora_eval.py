"""Error evaluation for the adapter benchmarks (runs in its own process, after the timed runs).

    python _lora_eval.py sum SPEC.json OUT.json      # issue 3: outputs vs the exact weighted sum Σ w_i ΔW_i
    python _lora_eval.py extract SPEC.json OUT.json  # issue 4: outputs vs the true delta W_ft − W_base

An adapter's ΔW is computed from its files as PEFT defines it: scale · B @ A with scale = lora_alpha / r
(or lora_alpha / √r with use_rslora), r and lora_alpha taken from rank_pattern / alpha_pattern when a pattern
matches the module (PEFT's ``(.*\\.)?(key)$`` regex, first match wins); transposed with fan_in_fan_out and for
embedding LoRAs. Full tensors shipped as modules_to_save count as W_shipped − W_base. A module missing from
an output counts as ΔW_approx = 0 (error = ‖ΔW‖).

Errors are Frobenius norms in float64: per module ‖ΔW − ΔW_approx‖; aggregated over modules as
√(Σ_m ‖E_m‖²) / √(Σ_m ‖ΔW_m‖²). The optimal rank-k error of a module is √(Σ_{j>k} σ_j²) from the singular
values of the dense reference (torch.linalg.svdvals, a full SVD without vectors).
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

torch.set_grad_enabled(False)


# --------------------------------------------------------------------------------------------------
# reading adapters and checkpoints
# --------------------------------------------------------------------------------------------------


def find_adapter_dir(path: Path) -> Path:
    """The folder holding adapter_config.json (PEFT saves a non-default adapter in a subfolder)."""
    if (path / "adapter_config.json").exists():
        return path
    found = sorted(path.rglob("adapter_config.json"))
    if not found:
        raise FileNotFoundError(f"no adapter_config.json under {path}")
    return found[0].parent


def _pattern(patterns: dict, module: str):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


class Adapter:
    """Factors of a PEFT LoRA adapter, by module name (``model.layers.0.self_attn.q_proj``)."""

    def __init__(self, path: Path):
        self.dir = find_adapter_dir(Path(path))
        self.config = json.loads((self.dir / "adapter_config.json").read_text())
        files = sorted(self.dir.glob("adapter_model*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no adapter_model*.safetensors in {self.dir}")
        self.files = files
        self.keys: dict[str, tuple[Path, str]] = {}
        for f in files:
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    self.keys[k] = (f, k)
        self.lora: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key, "emb": bool}
        self.full: dict[str, str] = {}  # tensor name -> key (modules_to_save)
        for k in self.keys:
            name = k[len("base_model.model.") :] if k.startswith("base_model.model.") else k
            m = re.match(r"^(.*)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name) or re.match(
                r"^(.*)\.(lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?$", name
            )
            if m:
                mod, kind = m.group(1), m.group(2)
                d = self.lora.setdefault(mod, {})
                d["A" if kind.endswith("A") else "B"] = k
                d["emb"] = kind.startswith("lora_embedding")
            elif "lora_" not in name:
                self.full[name.replace(".modules_to_save", "")] = k

    def tensor(self, key: str) -> torch.Tensor:
        f, k = self.keys[key]
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(k)

    def scale(self, module: str) -> float:
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module) or c["r"]
        alpha = _pattern(c.get("alpha_pattern") or {}, module) or c["lora_alpha"]
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def rank(self, module: str) -> int:
        return int(self.tensor(self.lora[module]["A"]).shape[0]) if module in self.lora else 0

    def delta(self, module: str) -> torch.Tensor | None:
        """ΔW of a module in float64, in the base weight's (out, in) layout; None if not a LoRA module."""
        d = self.lora.get(module)
        if not d:
            return None
        A = self.tensor(d["A"]).double()
        B = self.tensor(d["B"]).double()
        dw = self.scale(module) * (B @ A)
        if d["emb"] or self.config.get("fan_in_fan_out"):
            dw = dw.T
        return dw

    def file_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


class Checkpoint:
    """Tensor name -> file of a safetensors model folder (sharded or not)."""

    def __init__(self, path: Path):
        path = Path(path)
        idx = path / "model.safetensors.index.json"
        if idx.exists():
            wm = json.loads(idx.read_text())["weight_map"]
            self.where = {k: path / v for k, v in wm.items()}
        else:
            self.where = {}
            for f in sorted(path.glob("*.safetensors")):
                with safe_open(str(f), "pt") as h:
                    self.where.update({k: f for k in h.keys()})
        self.handles: dict[Path, object] = {}

    def get(self, name: str) -> torch.Tensor:
        f = self.where[name]
        with safe_open(str(f), "pt") as h:
            return h.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        f = self.where[name]
        with safe_open(str(f), "pt") as h:
            return list(h.get_slice(name).get_shape())


# --------------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------------


def optimal_tail(dw: torch.Tensor, k: int, dtype: torch.dtype) -> tuple[float, int]:
    """(√Σ_{j>k} σ_j², numerical rank) from a full SVD (singular values only) of dw."""
    s = torch.linalg.svdvals(dw.to(dtype)).double()
    tol = s[0].item() * max(dw.shape) * torch.finfo(dtype).eps if s.numel() else 0.0
    return float(s[k:].square().sum().sqrt()), int((s > tol).sum())


def aggregate(per_module: dict[str, dict], ref_norms: dict[str, float], key: str) -> dict:
    num = sum(v[key] ** 2 for v in per_module.values())
    den = sum(n**2 for n in ref_norms.values())
    rel = [v[key] / ref_norms[m] for m, v in per_module.items() if ref_norms[m] > 0]
    return {
        "rel_fro_aggregate": math.sqrt(num / den) if den else 0.0,
        "rel_fro_mean": sum(rel) / len(rel) if rel else 0.0,
        "rel_fro_max": max(rel) if rel else 0.0,
        "abs_fro_total": math.sqrt(num),
    }


def summarize_output(
    name: str, errs: dict[str, float], ref_norms: dict, opt: dict | None, extra: dict
) -> dict:
    per = {m: {"err": e} for m, e in errs.items()}
    out = {"name": name, **aggregate(per, ref_norms, "err"), **extra}
    if opt is not None:
        ratios = {m: errs[m] / opt[m] for m in errs if opt.get(m, 0) > 0}
        worst = sorted(ratios.items(), key=lambda kv: -kv[1])[:5]
        out["err_over_optimal_max"] = max(ratios.values()) if ratios else None
        out["err_over_optimal_median"] = sorted(ratios.values())[len(ratios) // 2] if ratios else None
        out["worst_vs_optimal"] = [[m, round(r, 6)] for m, r in worst]
        tot_opt = math.sqrt(sum(v**2 for v in opt.values()))
        out["aggregate_over_optimal"] = out["abs_fro_total"] / tot_opt if tot_opt else None
    out["per_module"] = {m: e for m, e in errs.items()}
    return out


# --------------------------------------------------------------------------------------------------
# issue 3: several adapters vs the exact weighted sum
# --------------------------------------------------------------------------------------------------


def eval_sum(spec: dict) -> dict:
    t0 = time.perf_counter()
    adapters = [Adapter(Path(p)) for p in spec["adapters"]]
    weights = [float(w) for w in spec["weights"]]
    k = int(spec["rank"])
    outputs = {n: Adapter(Path(p)) for n, p in spec["outputs"].items()}
    modules = sorted(set().union(*(a.lora for a in adapters)))
    ref_norms: dict[str, float] = {}
    opt: dict[str, float] = {}
    num_rank: dict[str, int] = {}
    errs: dict[str, dict[str, float]] = {n: {} for n in outputs}
    for mod in modules:
        S = None
        for a, w in zip(adapters, weights):
            d = a.delta(mod)
            if d is None:
                continue
            S = w * d if S is None else S + w * d
        ref_norms[mod] = float(torch.linalg.matrix_norm(S))
        opt[mod], num_rank[mod] = optimal_tail(S, k, torch.float64)
        for n, o in outputs.items():
            d = o.delta(mod)
            errs[n][mod] = float(torch.linalg.matrix_norm(S - d)) if d is not None else ref_norms[mod]
    per_opt = {m: {"err": e} for m, e in opt.items()}
    res = {
        "modules": len(modules),
        "rank": k,
        "reference_rank_max": max(num_rank.values()),
        "optimal": {**aggregate(per_opt, ref_norms, "err"), "per_module": opt},
        "outputs": {},
        "ref_norms": ref_norms,
    }
    for n, o in outputs.items():
        ranks = sorted({o.rank(m) for m in modules})
        extra = {
            "ranks": ranks,
            "missing_modules": sum(1 for m in modules if m not in o.lora),
            "file_bytes": o.file_bytes(),
        }
        use_opt = opt if max(ranks) <= k else None
        res["outputs"][n] = summarize_output(n, errs[n], ref_norms, use_opt, extra)
    res["eval_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------------
# issue 4: extracted adapters vs the true delta
# --------------------------------------------------------------------------------------------------


def eval_extract(spec: dict) -> dict:
    t0 = time.perf_counter()
    base = Checkpoint(Path(spec["base"]))
    ft = Checkpoint(Path(spec["ft"]))
    k = int(spec["rank"])
    svd_dtype = getattr(torch, spec.get("svd_dtype", "float64"))
    outputs = {n: Adapter(Path(p)) for n, p in spec["outputs"].items()}
    cache_path = Path(spec["optimal_cache"]) if spec.get("optimal_cache") else None
    cache = json.loads(cache_path.read_text()) if cache_path and cache_path.exists() else {}
    cache_key = f"{spec['base']}|{spec['ft']}|{k}|{spec.get('svd_dtype', 'float64')}"
    cached = cache.get(cache_key, {})
    ref_norms: dict[str, float] = {}
    opt: dict[str, float] = {}
    errs: dict[str, dict[str, float]] = {n: {} for n in outputs}
    unchanged_2d: list[str] = []
    changed_other: list[str] = []
    every = int(spec.get("layers_every", 1))  # evaluate every n-th layer only (full SVDs of big modules)
    for name in sorted(base.where):
        if name not in ft.where:
            continue
        layer = re.search(r"\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) % every:
            continue
        shape = base.shape(name)
        mod = name[: -len(".weight")] if name.endswith(".weight") else name
        Wb = base.get(name).double()
        Wf = ft.get(name).double()
        if Wf.shape != Wb.shape:
            changed_other.append(name)
            continue
        dW = Wf - Wb
        del Wf
        nrm = float(torch.linalg.vector_norm(dW))
        if len(shape) != 2:
            if nrm > 0:
                changed_other.append(name)
            continue
        if nrm == 0.0:
            unchanged_2d.append(name)
            continue
        ref_norms[mod] = nrm
        if mod in cached:
            opt[mod] = cached[mod]
        else:
            opt[mod], _ = optimal_tail(dW, k, svd_dtype)
        for n, o in outputs.items():
            d = o.delta(mod)
            if d is None and name in o.full:
                d = o.tensor(o.full[name]).double() - Wb
            errs[n][mod] = float(torch.linalg.matrix_norm(dW - d)) if d is not None else nrm
        del dW, Wb
    if cache_path is not None:
        cache[cache_key] = opt
        cache_path.write_text(json.dumps(cache))
    per_opt = {m: {"err": e} for m, e in opt.items()}
    res = {
        "modules": len(ref_norms),
        "rank": k,
        "unchanged_2d": unchanged_2d,
        "changed_other": changed_other,
        "optimal": {**aggregate(per_opt, ref_norms, "err"), "per_module": opt},
        "outputs": {},
        "ref_norms": ref_norms,
    }
    for n, o in outputs.items():
        ranks = sorted({o.rank(m) for m in ref_norms})
        extra = {
            "ranks": ranks,
            "lora_modules": len(o.lora),
            "full_tensors": sorted(o.full),
            "missing_modules": sum(1 for m in ref_norms if m not in o.lora),
            "file_bytes": o.file_bytes(),
        }
        res["outputs"][n] = summarize_output(n, errs[n], ref_norms, opt, extra)
    names = list(outputs)
    if len(names) >= 2:  # per-module ratio of the first output to the second (loracook / mergekit)
        a, b = names[0], names[1]
        ratios = {m: errs[a][m] / errs[b][m] for m in ref_norms if errs[b][m] > 0}
        worst = sorted(ratios.items(), key=lambda kv: -kv[1])[:5]
        res["pairwise"] = {
            "a": a,
            "b": b,
            "max_ratio": max(ratios.values()) if ratios else None,
            "worst": [[m, round(r, 6)] for m, r in worst],
        }
    res["eval_s"] = time.perf_counter() - t0
    return res


def main() -> None:
    mode, spec_path, out_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    spec = json.loads(spec_path.read_text())
    res = eval_sum(spec) if mode == "sum" else eval_extract(spec)
    out_path.write_text(json.dumps(res, indent=1))
    print(f"evaluated {res['modules']} modules in {res['eval_s']:.1f} s -> {out_path}")


if __name__ == "__main__":
    main()
