"""Routers: pick the mix of LoRA sources for each input instead of merging them (docs/routing.md).

    >>> from loracook.routing import load_router
    >>> model = load_router("out/skills-router")          # a transformers causal LM  # doctest: +SKIP
    >>> tok = model.router.tokenizer                       # doctest: +SKIP
    >>> ids = tok(["Rewrite as a headline: a cat naps"], return_tensors="pt")   # doctest: +SKIP
    >>> model.generate(**ids, max_new_tokens=12)           # routed on the prompt  # doctest: +SKIP
    >>> model.router.last_weights                          # [batch, n sources]    # doctest: +SKIP

Modules: ``prompts`` (JSONL prompt files), ``embed`` (prompt embeddings from the base's hidden states),
``methods`` (centroid, gate, arrow as pure functions), ``artifact`` (the router folder and router.json),
``build`` (writing a router folder), ``model`` (a router on a live model), ``evaluation`` (lm-eval),
``generate`` (batched text generation for the CLI). Importing this package imports nothing heavy.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Router",
    "RouterSpec",
    "attach_router",
    "generate_texts",
    "is_router",
    "load_router",
    "read_prompts",
    "read_spec",
    "router_candidate",
]

_WHERE = {
    "Router": "loracook.routing.model",
    "attach_router": "loracook.routing.model",
    "load_router": "loracook.routing.model",
    "RouterSpec": "loracook.routing.artifact",
    "is_router": "loracook.routing.artifact",
    "read_spec": "loracook.routing.artifact",
    "read_prompts": "loracook.routing.prompts",
    "router_candidate": "loracook.routing.evaluation",
    "generate_texts": "loracook.routing.generate",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'loracook.routing' has no attribute {name!r}")
