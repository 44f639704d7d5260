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
from loracook.io.adapter import Adapter, LoraModule, open_adapter
from loracook.io.checkpoint import open_checkpoint
from loracook.io.tensors import TensorReader


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

    @property
    def norm(self) -> float:
        return math.sqrt(sum(m.norm**2 for m in self.modules))

    def to_json(self) -> dict:
        return {
            "path": self.path,
            "peft_type": self.config.get("peft_type", "LORA"),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "norm": self.norm,
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


def _factors(adapter: Adapter, reader: TensorReader, module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    a = reader.read(module.a.name).to(torch.float32)
    b = reader.read(module.b.name).to(torch.float32) * module.scale
    return b, a


def summarize_adapter(path: str | Path) -> AdapterSummary:
    """Per-module rank, scale, norm, effective ranks and spectrum of a PEFT adapter.

    >>> summarize_adapter("recipes/adapters/vellmark-facts").modules[0].rank  # doctest: +SKIP
    8
    """
    from loracook.ops.factored import effective_rank, factored_svd

    adapter = open_adapter(path)
    reader = adapter.reader()
    modules = []
    try:
        for module in adapter.modules.values():
            b, a = _factors(adapter, reader, module)
            _, s, _ = factored_svd(b, a)
            norm = float(torch.linalg.vector_norm(s))
            modules.append(
                ModuleSummary(
                    module=module.module,
                    kind=module.kind,
                    shape=(b.shape[0], a.shape[1]),
                    rank=module.rank,
                    alpha=module.alpha,
                    scale=module.scale,
                    norm=norm,
                    rank90=effective_rank(s, 0.90),
                    rank99=effective_rank(s, 0.99),
                    spectrum=tuple(float(x) for x in s[: module.rank]),
                )
            )
    finally:
        reader.close()
    return AdapterSummary(str(path), adapter.config, tuple(modules))


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


def compare_adapters(paths: list[str | Path], names: list[str] | None = None) -> Similarity:
    """Pairwise cosine and subspace similarity of adapters made for the same base, from their factors."""
    from loracook.ops.factored import cosine_similarity, factored_svd, frobenius_inner, subspace_similarity

    names = names or [Path(p).name for p in paths]
    adapters = [open_adapter(p) for p in paths]
    readers = [a.reader() for a in adapters]
    try:
        shared = sorted(set.intersection(*(set(a.modules) for a in adapters)))
        for module in shared:
            shapes = {(a.modules[module].b.shape[0], a.modules[module].a.shape[1]) for a in adapters}
            if len(shapes) > 1:
                raise BadInput(
                    f"module {module} has different shapes in the adapters ({sorted(shapes)}): "
                    "they were made for different bases",
                    file=adapters[0].path,
                )
        if not shared:
            raise BadInput("the adapters share no module: nothing to compare", file=adapters[0].path)
        n = len(adapters)
        inner = [[0.0] * n for _ in range(n)]
        phi_sum = [[0.0] * n for _ in range(n)]
        per_module: dict[str, dict[str, float]] = {}
        for module in shared:
            factors = [_factors(a, r, a.modules[module]) for a, r in zip(adapters, readers, strict=True)]
            bases = [factored_svd(b, a)[0] for b, a in factors]
            ranks = [a.modules[module].rank for a in adapters]
            for i in range(n):
                for j in range(i, n):
                    value = float(frobenius_inner(factors[i][0], factors[i][1], factors[j][0], factors[j][1]))
                    inner[i][j] += value
                    if i != j:
                        inner[j][i] += value
                        cos = float(
                            cosine_similarity(factors[i][0], factors[i][1], factors[j][0], factors[j][1])
                        )
                        per_module.setdefault(f"{names[i]}|{names[j]}", {})[module] = cos
                        phi = subspace_similarity(bases[i], bases[j], ranks[i], ranks[j])
                        phi_sum[i][j] += phi
                        phi_sum[j][i] += phi
        cosine = tuple(
            tuple(
                inner[i][j] / math.sqrt(inner[i][i] * inner[j][j]) if inner[i][i] and inner[j][j] else 0.0
                for j in range(n)
            )
            for i in range(n)
        )
        subspace = tuple(
            tuple(1.0 if i == j else phi_sum[i][j] / len(shared) for j in range(n)) for i in range(n)
        )
    finally:
        for reader in readers:
            reader.close()
    return Similarity(tuple(names), cosine, subspace, per_module, len(shared))


def is_adapter(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
