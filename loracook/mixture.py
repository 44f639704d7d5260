"""A mixture of LoRA adapters on a live transformers model: y = W x + Σ_i c_i s_i B_i A_i x, exactly.

The base weights stay untouched; a forward hook on every targeted module adds the adapters' low-rank update.
Per module, every source's factors are stacked once into A_cat (R × in) and B_cat (out × R), R = Σ r_i, so one
forward costs two thin matmuls whatever the number of sources, and there are no cross terms B_i A_j: the
coefficient of source i scales only its own rank columns (h = x A_catᵀ; h *= c_i s_i per column; y += h B_catᵀ).
Changing the coefficients re-stacks nothing, which is what a weight search (many candidates) and a router (new
coefficients per batch, or per token) need.

Coefficients come in three modes:

* global: one vector ``[n]`` (a search candidate), optionally overridden per module (``per_module``: a dict or
  a function of the module name, so "per source × layer group" weights work);
* per row: ``[batch, n]``, one vector per prompt of the batch (a router deciding per prompt); rows follow the
  batch through ``generate`` (also when it repeats rows for ``num_return_sequences`` or beams);
* per layer: ``route(fn)`` with ``fn(module_name, x) -> [..., n]`` computed from that layer's own input
  (Arrow-style per-token routing).

    >>> sources = {"facts": load_peft_factors("adapters/facts"), "json": load_peft_factors("adapters/json")}  # doctest: +SKIP
    >>> with LoraMixture(model, sources) as mix:                     # doctest: +SKIP
    ...     mix.set([0.7, 0.3])                                      # the merged model 0.7·ΔW_facts + 0.3·ΔW_json
    ...     logits = model(ids).logits
    ...     mix.set(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))          # row 0 gets facts, row 1 gets json
    ...     out = model.generate(ids, attention_mask=mask)
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LoraFactors",
    "LoraMixture",
    "layer_index",
    "load_peft_factors",
]

PEFT_PREFIX = "base_model.model."

Coefficients = Tensor | Sequence[float] | Mapping[str, float]
PerModule = Mapping[str, Coefficients] | Callable[[str], Coefficients | None]
Router = Callable[[str, Tensor], Tensor]


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA in PEFT's conventions: ΔW = scale · b @ a.

    Linear and Conv1D: ``a`` is r × in, ``b`` is out × r (for Conv1D, which stores W as in × out, the delta of
    the stored weight is (b @ a)ᵀ · scale, but the forward update is the same). Embedding: ``a`` is
    r × num_embeddings, ``b`` is dim × r, and the delta of the (num_embeddings × dim) table is (b @ a)ᵀ · scale.
    """

    a: Tensor
    b: Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


# ----------------------------------------------------------------------------------------------------------
# Reading PEFT adapters

# init_lora_weights values whose saved factors are a plain LoRA on the unchanged base.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}
_FACTOR_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")


def load_peft_factors(folder: str | Path) -> dict[str, LoraFactors]:
    """A PEFT LoRA adapter folder as ``{module name: LoraFactors}``, module names as in ``model.named_modules()``.

    Scales follow PEFT: alpha / r, or alpha / sqrt(r) with use_rslora, per module from rank_pattern /
    alpha_pattern (regex keys matched as ``(.*\\.)?(key)$``, first match wins). Adapters that are not a plain
    low-rank update of the unchanged base (DoRA, lora_bias, modules_to_save, PiSSA/OLoRA inits, ...) raise a
    ValueError: a mixture of them would silently compute something else.
    """
    folder = Path(folder)
    config = _read_config(folder)
    _check_config(config, folder)
    tensors = _read_tensors(folder)
    parts = _group_factors(tensors, folder)
    return {module: _factors(module, found, config, folder) for module, found in sorted(parts.items())}


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no adapter_config.json (is this a PEFT adapter folder?)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    return config


def _check_config(config: dict[str, Any], folder: Path) -> None:
    where = folder / "adapter_config.json"
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type {peft_type} is not a LoRA adapter")
    if config.get("use_dora"):
        raise ValueError(
            f"{where}: DoRA adapters (use_dora) are not a low-rank update and cannot be mixed; "
            "merge them into a model instead"
        )
    if config.get("lora_bias"):
        raise ValueError(f"{where}: adapters with lora_bias cannot be mixed (the bias is not low-rank)")
    init = config.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ValueError(
            f"{where}: init_lora_weights={init!r} adapters are relative to a modified base; save them with "
            "path_initial_model_for_weight_conversion to make them a plain LoRA"
        )
    for key in ("layer_replication", "trainable_token_indices", "target_parameters", "loftq_config"):
        if config.get(key):
            raise ValueError(f"{where}: {key} is not supported by the LoRA mixture")


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(safetensors_file)
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def _group_factors(tensors: Mapping[str, Tensor], folder: Path) -> dict[str, dict[str, Tensor]]:
    """Group tensors by module; refuse every tensor that is not a LoRA factor (they would be dropped)."""
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in _FACTOR_SUFFIXES if name.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(name[: -len(suffix)], {})[suffix] = value
        elif "lora_magnitude_vector" in name:
            raise ValueError(f"{folder}: {key} is a DoRA magnitude; DoRA adapters cannot be mixed")
        elif name.endswith(".lora_B.bias"):
            raise ValueError(f"{folder}: {key} is a lora_bias; such adapters cannot be mixed")
        elif ".base_layer." in name:
            continue  # an unchanged copy of the base embedding (save_embedding_layers)
        else:
            raise ValueError(
                f"{folder}: {key} is a full tensor (modules_to_save or a trained bias), not a LoRA factor; "
                "the mixture cannot weight it"
            )
    if not parts:
        raise ValueError(f"{folder}: the adapter holds no LoRA factors")
    return parts


def _factors(module: str, found: dict[str, Tensor], config: dict[str, Any], folder: Path) -> LoraFactors:
    embedding = ".lora_embedding_A" in found or ".lora_embedding_B" in found
    a = found.get(".lora_embedding_A" if embedding else ".lora_A.weight")
    b = found.get(".lora_embedding_B" if embedding else ".lora_B.weight")
    if a is None or b is None:
        raise ValueError(f"{folder}: module {module} has only one of its two LoRA factors")
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"{folder}: module {module} has factors of shapes {tuple(a.shape)}, {tuple(b.shape)}"
        )
    rank = int(a.shape[0])
    config_rank = _pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8))
    if int(config_rank) != rank:
        raise ValueError(
            f"{folder}: module {module} has rank {rank} but adapter_config.json says {config_rank}"
        )
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraFactors(a=a, b=b, scale=scale)


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key with re.match(rf"(.*\\.)?({key})$")."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def layer_index(module_name: str) -> int | None:
    """The decoder layer a module belongs to (``model.layers.3.mlp.up_proj`` -> 3; GPT-2's ``h.3`` too), or
    None for modules outside the layers (embeddings, lm_head): the building block of per-layer-group weights."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------
# One hooked module


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


# ----------------------------------------------------------------------------------------------------------
# The mixture


class LoraMixture:
    """Attach n LoRA sources to a loaded model as an exact, re-weightable mixture (see the module docstring).

    ``sources`` maps source name -> {module name -> LoraFactors}; module names are the model's own
    (``model.layers.0.self_attn.q_proj``). Targets may be nn.Linear, nn.Embedding or transformers' Conv1D.
    Factors are cast to each module's weight dtype and device once, here.

    ``tied_output`` matters only when the input embedding and the output head share one weight and a source
    adapts one of them: True (default) adds the transposed delta to the other too, as the merged model does
    (one tensor W + ΔW, read twice); False adapts only the named module, as PEFT's unmerged forward does.

    After ``attach()`` every coefficient is 0 (the model computes the base) until ``set`` or ``route``.
    """

    def __init__(
        self,
        model: nn.Module,
        sources: Mapping[str, Mapping[str, LoraFactors]],
        *,
        tied_output: bool = True,
    ):
        if not sources:
            raise ValueError("a LoRA mixture needs at least one source")
        self.model = model
        self.names: tuple[str, ...] = tuple(sources)
        modules = dict(model.named_modules())
        self._slots = _build_slots(modules, self.names, sources, model, tied_output)
        self._router: Router | None = None
        self.attached = False

    @classmethod
    def from_peft(cls, model: nn.Module, folders: Mapping[str, str | Path], **kwargs: Any) -> LoraMixture:
        """A mixture of PEFT adapter folders, ``{source name: folder}``, in that order."""
        return cls(model, {name: load_peft_factors(path) for name, path in folders.items()}, **kwargs)

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def modules(self) -> tuple[str, ...]:
        """The module names the mixture hooks (a tied output head appears under its own name)."""
        return tuple(dict.fromkeys(slot.module_name for slot in self._slots))

    @property
    def rank(self) -> int:
        """Σ r_i over sources and modules: the total number of rank columns the mixture evaluates."""
        return sum(int(slot.b_cat.shape[1]) for slot in self._slots)

    # -- attaching --------------------------------------------------------------------------------------

    def attach(self) -> LoraMixture:
        """Hook every targeted module (idempotent). Coefficients start at 0 unless set before attaching."""
        if self.attached:
            return self
        modules = dict(self.model.named_modules())
        for slot in self._slots:
            slot.handle = modules[slot.module_name].register_forward_hook(self._hook(slot), with_kwargs=True)
        self.attached = True
        return self

    def detach(self) -> None:
        """Remove every hook: the model is exactly the original again (its weights were never touched)."""
        for slot in self._slots:
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None
        self.attached = False

    def __enter__(self) -> LoraMixture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- coefficients -----------------------------------------------------------------------------------

    def set(self, coefficients: Coefficients | None, *, per_module: PerModule | None = None) -> None:
        """Fix the coefficients: ``[n]`` for every row, or ``[batch, n]`` one vector per row of the batch.

        ``coefficients`` may be a tensor, a sequence of n numbers, or a mapping with every source name; None is
        all zeros. ``per_module`` overrides them for some modules: a mapping {module name: coefficients} or a
        function ``name -> coefficients | None`` (None keeps the default), called with each merged tensor's
        module name (for a tied output head, the embedding's). Clears any router. Cost: one small gather per
        module, no re-stacking.
        """
        self._router = None
        default = self._vector(coefficients)
        overrides = self._override_lookup(per_module)
        for slot in self._slots:
            chosen = overrides(slot.key)
            vector = default if chosen is None else self._vector(chosen)
            slot.columns = None if bool((vector == 0).all()) else slot.columns_for(vector)

    def route(self, fn: Router) -> None:
        """Compute coefficients inside the forward pass: ``fn(module_name, x) -> [..., n]`` from the input x
        of the hooked module (hidden states ``[batch, seq, in]``; token ids for an embedding).

        The result may be ``[batch, seq, n]`` (per token), ``[batch, n]`` (per row) or ``[n]``. Gradients
        flow through it, so a trainable gate can be fitted through the mixture.
        """
        self._router = fn
        for slot in self._slots:
            slot.columns = None

    def clear(self) -> None:
        """All coefficients 0 and no router: the hooked model computes the base model."""
        self.set(None)

    def _vector(self, coefficients: Coefficients | None) -> Tensor:
        if coefficients is None:
            return torch.zeros(self.n, dtype=torch.float64)
        if isinstance(coefficients, Mapping):
            unknown = set(coefficients) - set(self.names)
            missing = [name for name in self.names if name not in coefficients]
            if unknown or missing:
                raise ValueError(
                    f"coefficients name unknown sources {sorted(unknown)} / miss {missing}; "
                    f"the sources are {list(self.names)}"
                )
            coefficients = [float(coefficients[name]) for name in self.names]
        vector = torch.as_tensor(coefficients)
        if not vector.is_floating_point():
            vector = vector.to(torch.float64)
        if vector.dim() not in (1, 2) or vector.shape[-1] != self.n:
            raise ValueError(
                f"coefficients must be [{self.n}] or [batch, {self.n}], got {tuple(vector.shape)}"
            )
        first = self._slots[0]
        return vector.to(first.coef_dtype).to(first.b_cat.device)

    def _override_lookup(self, per_module: PerModule | None) -> Callable[[str], Coefficients | None]:
        if per_module is None:
            return lambda key: None
        if callable(per_module) and not isinstance(per_module, Mapping):
            return per_module
        keys = {slot.key for slot in self._slots}
        unknown = sorted(set(per_module) - keys)
        if unknown:
            raise ValueError(f"per_module names modules the mixture does not adapt: {unknown[:5]}")
        return per_module.get

    # -- the hook ---------------------------------------------------------------------------------------

    def _hook(self, slot: _Slot) -> Callable[..., Tensor]:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = args[0] if args else next(iter(kwargs.values()))
            columns = self._columns(slot, x)
            if columns is None:
                return output
            return slot.add_delta(output, x, columns)

        return hook

    def _columns(self, slot: _Slot, x: Tensor) -> Tensor | None:
        if self._router is not None:
            return _token_columns(slot.columns_for(self._router(slot.module_name, x)), x, slot.kind)
        columns = slot.columns
        if columns is None or columns.dim() == 1:
            return columns
        return _row_columns(columns, x, slot.kind)


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
