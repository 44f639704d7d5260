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

The package: ``factors.py`` (LoraFactors, PEFT adapters read through loracook.io.peft), ``slots.py`` (one hooked
module: the stacked factors, the coefficients per rank column, the checks against the model) and
``lora_mixture.py`` (LoraMixture: attach, set, route).
"""

from __future__ import annotations

from loracook.mixture.factors import LoraFactors, layer_index, load_peft_factors
from loracook.mixture.lora_mixture import Coefficients, LoraMixture, PerModule, Router

__all__ = [
    "Coefficients",
    "LoraFactors",
    "LoraMixture",
    "PerModule",
    "Router",
    "layer_index",
    "load_peft_factors",
]
