"""One hooked module of the mixture: every source's factors stacked once (A_cat, B_cat), the per-column
coefficients c_i · s_i, and the delta added to the module's output; the checks of the sources against the model
that build the slots (shapes, module kinds, a tied embedding and output head)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from loracook.mixture.factors import LoraFactors


class _Slot:
    """The stacked factors of every source on one module, and the per-column coefficients in use.

    ``key`` names the merged tensor (what per_module overrides are keyed by); ``module_name`` is the module the
    hook sits on. They differ only for the tied output head, which carries the embedding's delta transposed.
    """

    def __init__(self, key: str, module_name: str, kind: str, parts: list[tuple[int, Tensor, Tensor, float]]):
        self.key, self.module_name, self.kind = key, module_name, kind
        a_cat = torch.cat([a for _, a, _, _ in parts], dim=0)  # R × in (embedding: R × num_embeddings)
        self.b_cat = torch.cat([b for _, _, b, _ in parts], dim=1).contiguous()  # out × R
        # Embeddings look rows up: keep A_catᵀ (num_embeddings × R) contiguous for F.embedding.
        self.a_cat = a_cat.t().contiguous() if kind == "embedding" else a_cat.contiguous()
        self.source_of_column = torch.cat(
            [torch.full((a.shape[0],), i, dtype=torch.long) for i, a, _, _ in parts]
        ).to(a_cat.device)
        # c_i · s_i is formed in at least fp32 (fp64 is unavailable on some accelerators), then cast.
        self.coef_dtype = torch.promote_types(a_cat.dtype, torch.float32)
        self.column_scale = torch.cat(
            [torch.full((a.shape[0],), float(s), dtype=self.coef_dtype) for _, a, _, s in parts]
        ).to(a_cat.device)
        self.columns: Tensor | None = None  # [R] or [rows, R] in the compute dtype; None: contributes nothing
        self.handle: Any = None

    def columns_for(self, coefficients: Tensor) -> Tensor:
        """Per-rank-column multipliers c_i · s_i from coefficients [..., n], in the compute dtype."""
        cols = coefficients.to(self.column_scale)[..., self.source_of_column] * self.column_scale
        return cols.to(self.b_cat.dtype)

    def add_delta(self, output: Tensor, x: Tensor, columns: Tensor) -> Tensor:
        """output + Σ_i c_i s_i B_i A_i x, for this module's input x ([..., in], or token ids for an embedding).

        The second product and the sum are one addmm (no delta tensor); outside autograd it writes into the
        module's fresh output in place, which saves a pass over it.
        """
        if self.kind == "embedding":
            h = nn.functional.embedding(x, self.a_cat)
        else:
            h = nn.functional.linear(x, self.a_cat)
        h = (h * columns).reshape(-1, h.shape[-1])
        flat = output.view(-1, output.shape[-1]) if output.is_contiguous() else None
        if flat is not None and output.dtype == h.dtype and not torch.is_grad_enabled():
            flat.addmm_(h, self.b_cat.t())
            return output
        return output + nn.functional.linear(h, self.b_cat).view(output.shape).to(output.dtype)


def _row_columns(columns: Tensor, x: Tensor, kind: str) -> Tensor:
    """Broadcast per-row columns [rows, R] to h = [batch, ..., R]; generate may repeat rows (beams, samples)."""
    rows, batch = columns.shape[0], x.shape[0]
    if batch != rows:
        if batch % rows:
            raise ValueError(f"per-row coefficients have {rows} rows but the batch has {batch}")
        columns = columns.repeat_interleave(batch // rows, dim=0)
    extra = x.dim() - (1 if kind == "embedding" else 2)
    return columns.view(batch, *([1] * extra), columns.shape[-1])


def _token_columns(columns: Tensor, x: Tensor, kind: str) -> Tensor:
    """Align router output columns with h: [..., R] per token, [batch, R] per row, or [R] for all."""
    h_dims = x.dim() + (1 if kind == "embedding" else 0)
    if columns.dim() == 1 or columns.dim() == h_dims:
        return columns
    if columns.dim() == 2 and h_dims > 2:
        return _row_columns(columns, x, kind)
    raise ValueError(
        f"router coefficients of shape {tuple(columns.shape)} do not fit an input of {tuple(x.shape)}"
    )


def _build_slots(
    modules: Mapping[str, nn.Module],
    names: tuple[str, ...],
    sources: Mapping[str, Mapping[str, LoraFactors]],
    model: nn.Module,
    tied_output: bool,
) -> list[_Slot]:
    """Validate every source against the model and stack each module's factors (one slot per hooked tensor)."""
    per_module: dict[tuple[str, str], list[tuple[int, Tensor, Tensor, float]]] = {}
    kinds: dict[str, str] = {}
    tied = _tied_pair(model, modules) if tied_output else None
    for index, name in enumerate(names):
        for module_name, factors in sources[name].items():
            module = modules.get(module_name)
            if module is None:
                raise ValueError(f"source {name!r}: the model has no module {module_name!r}")
            kind = _kind(module, module_name, name)
            a, b = _checked_factors(module, kind, factors, f"source {name!r}, module {module_name!r}")
            kinds[module_name] = kind
            per_module.setdefault((module_name, module_name), []).append((index, a, b, factors.scale))
            if tied is not None and module_name in tied:
                # The shared weight W + ΔW is also read by the other module: ΔW's transpose swaps the factors.
                partner = tied[module_name]
                kinds[partner] = _kind(modules[partner], partner, name)
                per_module.setdefault((module_name, partner), []).append((index, b.t(), a.t(), factors.scale))
    if not per_module:
        raise ValueError("no source adapts any module")
    return [_Slot(key, target, kinds[target], parts) for (key, target), parts in per_module.items()]


def _tied_pair(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, str] | None:
    """{embedding name: head name, head name: embedding name} when the two share one weight, else None."""
    get_in, get_out = (
        getattr(model, "get_input_embeddings", None),
        getattr(model, "get_output_embeddings", None),
    )
    if get_in is None or get_out is None:
        return None
    emb, head = get_in(), get_out()
    if emb is None or head is None or emb.weight is not head.weight:
        return None
    ids = {id(module): name for name, module in modules.items()}
    emb_name, head_name = ids.get(id(emb)), ids.get(id(head))
    if emb_name is None or head_name is None:
        return None
    return {emb_name: head_name, head_name: emb_name}


def _kind(module: nn.Module, module_name: str, source: str) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):  # transformers' GPT-2 style layer
        return "conv1d"
    raise ValueError(
        f"source {source!r}: module {module_name!r} is a {type(module).__name__}; the mixture adapts "
        "nn.Linear, nn.Embedding and Conv1D"
    )


def _checked_factors(module: nn.Module, kind: str, factors: LoraFactors, where: str) -> tuple[Tensor, Tensor]:
    """Factors cast to the module's dtype and device, after checking their shapes against the module."""
    weight = module.weight
    if kind == "linear":
        out_features, in_features = weight.shape
    elif kind == "conv1d":
        in_features, out_features = weight.shape  # Conv1D stores W transposed (in × out)
    else:
        in_features, out_features = weight.shape  # the table is num_embeddings × dim
    a, b = factors.a, factors.b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{where}: factors of shapes {tuple(a.shape)} and {tuple(b.shape)} are not a LoRA")
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise ValueError(
            f"{where}: factors {tuple(a.shape)} / {tuple(b.shape)} do not fit a {kind} of "
            f"{in_features} -> {out_features} (A must be r × {in_features}, B {out_features} × r)"
        )
    return (
        a.detach().to(device=weight.device, dtype=weight.dtype),
        b.detach().to(device=weight.device, dtype=weight.dtype),
    )
