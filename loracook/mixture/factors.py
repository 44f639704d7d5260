"""One module's LoRA factors (:class:`LoraFactors`), a PEFT adapter folder read as them (:func:`load_peft_factors`)
and the decoder layer of a module (:func:`layer_index`).

Adapters are read through :mod:`loracook.io.peft`, the one door to PEFT files (its config checks, rank and
alpha patterns, scales and tensor reader); what the mixture adds is the refusal of everything that is not a plain
low-rank update of the unchanged base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from loracook.errors import BadInput
from loracook.io.peft import Adapter, open_adapter
from loracook.io.tensors import Readers


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


def load_peft_factors(folder: str | Path) -> dict[str, LoraFactors]:
    """A PEFT LoRA adapter folder as ``{module name: LoraFactors}``, module names as in ``model.named_modules()``.

    Read through :func:`loracook.io.peft.open_adapter`. Scales follow PEFT: alpha / r, or alpha / sqrt(r) with
    use_rslora, per module from rank_pattern / alpha_pattern (regex keys matched as ``(.*\\.)?(key)$``, first
    match wins). Adapters that are not a plain low-rank update of the unchanged base (DoRA, lora_bias,
    modules_to_save, PiSSA/OLoRA inits, ...) raise a ValueError: a mixture of them would silently compute
    something else. So does anything io.peft refuses (the message is its one line, after the folder).
    """
    folder = Path(folder)
    try:
        adapter = open_adapter(folder)
        _check_plain(adapter, folder)
        readers = Readers()
        try:
            return {
                module: LoraFactors(a=readers.read(lora.a), b=readers.read(lora.b), scale=lora.scale)
                for module, lora in adapter.modules.items()
            }
        finally:
            readers.close()
    except BadInput as error:
        reason = f"{error.message}; {error.fix}" if error.fix else error.message
        raise ValueError(f"{folder}: {reason}") from None


def _check_plain(adapter: Adapter, folder: Path) -> None:
    """Refuse what io.peft reads (to merge it into a model) but the mixture cannot weight."""
    where = folder / "adapter_config.json"
    if adapter.config.get("use_dora"):
        raise ValueError(
            f"{where}: DoRA adapters (use_dora) are not a low-rank update and cannot be mixed; "
            "merge them into a model instead"
        )
    if adapter.config.get("lora_bias"):
        raise ValueError(f"{where}: adapters with lora_bias cannot be mixed (the bias is not low-rank)")
    for lora in adapter.modules.values():
        if lora.magnitude is not None:
            raise ValueError(
                f"{folder}: {lora.magnitude.name} is a DoRA magnitude; DoRA adapters cannot be mixed"
            )
        if lora.bias is not None:
            raise ValueError(f"{folder}: {lora.bias.name} is a lora_bias; such adapters cannot be mixed")
    for info in adapter.full.values():
        if info.name not in adapter.base_layer_copies:  # a copy of the base embedding is unchanged: skipped
            raise ValueError(
                f"{folder}: {info.name} is a full tensor (modules_to_save or a trained bias), not a LoRA factor; "
                "the mixture cannot weight it"
            )
    if not adapter.modules:
        raise ValueError(f"{folder}: the adapter holds no LoRA factors")


def layer_index(module_name: str) -> int | None:
    """The decoder layer a module belongs to (``model.layers.3.mlp.up_proj`` -> 3; GPT-2's ``h.3`` too), or
    None for modules outside the layers (embeddings, lm_head): the building block of per-layer-group weights."""
    match = re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", f".{module_name}.")
    return int(match.group(1)) if match else None
