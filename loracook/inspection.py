"""What is inside adapters and models, and how similar adapters are; all from the factors (no dense ΔW).

For one adapter: per module rank, alpha, scale, ‖ΔW‖_F, effective rank at 90% and 99% energy and the singular
spectrum, from QR of B and Aᵀ and an SVD of the small core. For several adapters on one base: the cosine
similarity of ΔW per module and overall, ⟨ΔW_i, ΔW_j⟩_F = tr((B_iᵀB_j)(A_jA_iᵀ)), and the subspace similarity
φ of Hu et al. (2021, section 7) between their top left singular directions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loracook.errors import BadInput
from loracook.io.checkpoint import open_checkpoint
from loracook.io.peft import Adapter, open_adapter, read_factors
from loracook.io.tensors import Readers


@dataclass(frozen=True)
class ModuleSummary:
    module: str
    kind: str
    shape: tuple[int, int]  # ΔW as (out, in) in factor space
    rank: int
    alpha: float
    scale: float
    norm: float
    rank90: int
    rank99: int
    spectrum: tuple[float, ...]  # singular values of ΔW, largest first (at most `rank` of them)


@dataclass(frozen=True)
class AdapterSummary:
    path: str
    config: dict
    modules: tuple[ModuleSummary, ...]
    serving: dict | None = None  # loracook.serving.serving_summary: vLLM / LoRAX, the --max-lora-rank needed

    @property
    def norm(self) -> float:
        return math.sqrt(sum(m.norm**2 for m in self.modules))

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "peft_type": self.config.get("peft_type", "LORA"),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "norm": self.norm,
            "serving": self.serving,
            "modules": [
                m.__dict__ | {"shape": list(m.shape), "spectrum": list(m.spectrum)} for m in self.modules
            ],
        }


@dataclass(frozen=True)
class ModelSummary:
    path: str
    architecture: str
    parameters: int
    dtypes: dict[str, int]  # dtype -> parameter count
    shards: tuple[tuple[str, int], ...]  # file name, bytes
    layers: int

    def to_json(self) -> dict:
        return self.__dict__ | {"shards": [list(s) for s in self.shards]}


@dataclass(frozen=True)
class Similarity:
    names: tuple[str, ...]
    cosine: tuple[tuple[float, ...], ...]  # overall, over all shared modules
    subspace: tuple[tuple[float, ...], ...]  # mean φ over shared modules
    per_module: dict[str, dict[str, float]] = field(default_factory=dict)  # "i|j" -> module -> cosine
    shared_modules: int = 0

    def to_json(self) -> dict:
        return {
            "names": list(self.names),
            "cosine": [list(r) for r in self.cosine],
            "subspace": [list(r) for r in self.subspace],
            "shared_modules": self.shared_modules,
            "per_module_cosine": self.per_module,
        }


Decomposition = dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # module -> U, S, Vh of ΔW


def _decompose(adapter: Adapter) -> Decomposition:
    """Thin SVD of every module's s·B@A from its factors (QR of B and Aᵀ, SVD of the r×r core)."""
    from loracook.ops.factored import factored_svd

    readers = Readers()
    out: Decomposition = {}
    try:
        for module in adapter.modules.values():
            a, b = read_factors(readers.read, module)
            out[module.module] = factored_svd(b, a)
    finally:
        readers.close()
    return out


def summarize_adapter(path: str | Path, decomposition: Decomposition | None = None) -> AdapterSummary:
    """Per-module rank, scale, norm, effective ranks and spectrum of a PEFT adapter.

    >>> summarize_adapter("recipes/adapters/vellmark-facts").modules[0].rank  # doctest: +SKIP
    8
    """
    from loracook.ops.factored import effective_rank

    adapter = open_adapter(path)
    decomposition = decomposition or _decompose(adapter)
    modules = []
    for module in adapter.modules.values():
        u, s, vh = decomposition[module.module]
        modules.append(
            ModuleSummary(
                module=module.module,
                kind=module.kind,
                shape=(u.shape[0], vh.shape[1]),
                rank=module.rank,
                alpha=module.alpha,
                scale=module.scale,
                norm=float(torch.linalg.vector_norm(s)),
                rank90=effective_rank(s, 0.90),
                rank99=effective_rank(s, 0.99),
                spectrum=tuple(float(x) for x in s[: module.rank]),
            )
        )
    from loracook.serving import facts_from_folder, serving_summary

    serving = serving_summary(facts_from_folder(path))
    return AdapterSummary(str(path), adapter.config, tuple(modules), serving)


def inspect_adapters(paths: list[str | Path]) -> tuple[list[AdapterSummary], Similarity | None]:
    """Summaries of every adapter and, for two or more, their similarity; each SVD is computed once."""
    adapters = [open_adapter(p) for p in paths]
    decompositions = [_decompose(a) for a in adapters]
    summaries = [summarize_adapter(p, d) for p, d in zip(paths, decompositions, strict=True)]
    similarity = None
    if len(adapters) > 1:
        similarity = compare_adapters(paths, adapters=adapters, decompositions=decompositions)
    return summaries, similarity


def summarize_model(path: str | Path) -> ModelSummary:
    checkpoint = open_checkpoint(path)
    dtypes: dict[str, int] = {}
    for info in checkpoint.tensors.values():
        key = str(info.dtype).removeprefix("torch.")
        dtypes[key] = dtypes.get(key, 0) + math.prod(info.shape)
    sizes: dict[str, int] = {}
    for info in checkpoint.tensors.values():
        sizes[Path(info.file).name] = sizes.get(Path(info.file).name, 0) + info.nbytes
    architectures = checkpoint.config.get("architectures") or [checkpoint.config.get("model_type", "unknown")]
    return ModelSummary(
        path=str(path),
        architecture=str(architectures[0]),
        parameters=sum(dtypes.values()),
        dtypes=dtypes,
        shards=tuple(sorted(sizes.items())),
        layers=checkpoint.num_layers,
    )


def compare_adapters(
    paths: list[str | Path],
    names: list[str] | None = None,
    *,
    adapters: list[Adapter] | None = None,
    decompositions: list[Decomposition] | None = None,
) -> Similarity:
    """Pairwise cosine and subspace similarity of adapters made for the same base, from their factors.

    With ΔW = U S Vh, ⟨ΔW_i, ΔW_j⟩_F = tr((U_iS_i)ᵀ(U_jS_j) (Vh_j Vh_iᵀ)), an r_i × r_j computation.
    """
    from loracook.ops.factored import frobenius_inner, subspace_similarity

    names = names or [Path(p).name for p in paths]
    adapters = adapters or [open_adapter(p) for p in paths]
    shared = sorted(set.intersection(*(set(a.modules) for a in adapters)))
    for module in shared:
        shapes = {a.modules[module].delta_shape for a in adapters}
        if len(shapes) > 1:
            raise BadInput(
                f"module {module} has different shapes in the adapters ({sorted(shapes)}): "
                "they were made for different bases",
                file=adapters[-1].path,
            )
    if not shared:
        raise BadInput("the adapters share no module: nothing to compare", file=adapters[0].path)
    decompositions = decompositions or [_decompose(a) for a in adapters]
    n = len(adapters)
    inner = [[0.0] * n for _ in range(n)]
    phi_sum = [[0.0] * n for _ in range(n)]
    per_module: dict[str, dict[str, float]] = {}
    for module in shared:
        parts = [d[module] for d in decompositions]
        ranks = [a.modules[module].rank for a in adapters]
        scaled = [(u * s, vh) for u, s, vh in parts]
        norms = [float(torch.linalg.vector_norm(s)) for _, s, _ in parts]
        for i in range(n):
            inner[i][i] += norms[i] ** 2
            for j in range(i + 1, n):
                value = float(frobenius_inner(scaled[i][0], scaled[i][1], scaled[j][0], scaled[j][1]))
                inner[i][j] += value
                inner[j][i] += value
                denominator = norms[i] * norms[j]
                cos = max(-1.0, min(1.0, value / denominator)) if denominator else 0.0
                per_module.setdefault(f"{names[i]}|{names[j]}", {})[module] = cos
                phi = subspace_similarity(
                    parts[i][0],
                    parts[j][0],
                    min(ranks[i], parts[i][0].shape[1]),
                    min(ranks[j], parts[j][0].shape[1]),
                )
                phi_sum[i][j] += phi
                phi_sum[j][i] += phi
    cosine = tuple(
        tuple(
            1.0
            if i == j
            else (inner[i][j] / math.sqrt(inner[i][i] * inner[j][j]) if inner[i][i] and inner[j][j] else 0.0)
            for j in range(n)
        )
        for i in range(n)
    )
    subspace = tuple(
        tuple(1.0 if i == j else phi_sum[i][j] / len(shared) for j in range(n)) for i in range(n)
    )
    return Similarity(tuple(names), cosine, subspace, per_module, len(shared))


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
