"""What tensor names mean across architectures (Llama, GPT-2, BERT-style): the embeddings.

One place for the patterns, used by the planner (a tied lm_head goes to the token embedding), the extraction
(embeddings become embedding LoRAs) and per-layer weights (embeddings take the first value).

>>> is_embedding("transformer.wpe.weight"), is_token_embedding("transformer.wpe.weight")
(True, False)
>>> is_token_embedding("model.embed_tokens.weight")
True
"""

from __future__ import annotations

import re

TOKEN_EMBEDDING = re.compile(r"(embed_tokens|wte|word_embeddings)\.weight$")
EMBEDDING = re.compile(r"(embed_tokens|embed_positions|wte|wpe|word_embeddings|position_embeddings)\.weight$")


# Model types whose linear layers are transformers' Conv1D, stored (in, out): PEFT's fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


def stores_transposed(config: dict) -> bool:
    """True when the architecture stores its linear weights transposed (GPT-2's Conv1D)."""
    return str(config.get("model_type", "")) in CONV1D_MODEL_TYPES


def is_embedding(name: str) -> bool:
    """Token or position embedding table (stored num_embeddings × dim)."""
    return EMBEDDING.search(name) is not None


def is_token_embedding(name: str) -> bool:
    return TOKEN_EMBEDDING.search(name) is not None
