"""The mixture itself: :class:`LoraMixture` attaches the slots' forward hooks to a model and sets the
coefficients (global, per row, per module) or a router computed inside the forward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loracook.mixture.factors import LoraFactors, load_peft_factors
from loracook.mixture.slots import _build_slots, _row_columns, _Slot, _token_columns

Coefficients = Tensor | Sequence[float] | Mapping[str, float]
PerModule = Mapping[str, Coefficients] | Callable[[str], Coefficients | None]
Router = Callable[[str, Tensor], Tensor]


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
