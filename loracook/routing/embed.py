"""Prompt embeddings for the exemplar routers: the base model's own hidden states, mean-pooled.

The embedding of a prompt is the output of decoder block ``layer`` (transformers' ``hidden_states[layer]``;
0 is the token embeddings), averaged over the prompt's tokens except the first (padding excluded; see
:func:`pooling_mask`). The default layer is the
middle one, ``num_layers // 2``: early layers see mostly the surface form of the tokens, the last ones are
specialised for the next token, and the middle of the network is where a prompt's topic and task are most
linearly separable. Only the blocks up to ``layer`` run (a forward hook stops the pass there), so deciding
costs about half a prefill for the default layer.

The pass always runs the *base* model: a router is attached to a model carrying a LoRA mixture, and the
caller zeroes the mixture's coefficients first (the decision must not depend on the adapters it chooses).
Position ids are computed from the attention mask, so a left-padded row gets the embedding it gets alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["decoder_blocks", "default_layer", "embed_prompts", "embed_tokens", "num_layers"]


class _Stop(Exception):
    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (``model.layers`` of Llama-likes, ``h`` of GPT-2)."""
    body = getattr(model, "base_model", model)
    for name in ("layers", "h", "blocks", "layer"):
        blocks = getattr(body, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return blocks
    lists = [m for m in body.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}")
    return max(lists, key=len)


def num_layers(model: nn.Module) -> int:
    return len(decoder_blocks(model))


def default_layer(layers: int) -> int:
    """The middle decoder block (1-based hidden-state index)."""
    return max(1, layers // 2)


@torch.no_grad()
def embed_tokens(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, layer: int) -> Tensor:
    """Mean-pooled hidden states at ``layer`` of a tokenized batch: [batch, hidden] in float32."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(input_ids.device)
    body = getattr(model, "base_model", model)
    if layer == 0:
        target: nn.Module = model.get_input_embeddings()
    else:
        target = decoder_blocks(model)[layer - 1]

    def stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _Stop(output[0] if isinstance(output, tuple) else output)

    handle = target.register_forward_hook(stop)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    try:
        body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _Stop as stopped:
        hidden = stopped.hidden
    else:  # pragma: no cover - the hook always fires
        raise RuntimeError(f"layer {layer} was never reached")
    finally:
        handle.remove()
    weights = pooling_mask(attention_mask).unsqueeze(-1)
    return (hidden.to(torch.float32) * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def pooling_mask(attention_mask: Tensor) -> Tensor:
    """The tokens averaged: every real token but the first (when there are two or more). The first position
    of a sequence carries the model's "attention sink", a massive activation unrelated to the prompt (norm
    about 24,000 against about 160 for the others at layer 15 of SmolLM2-135M), which would otherwise
    dominate the mean and make every prompt that starts with the same word look alike."""
    weights = attention_mask.to(torch.float32).clone()
    first = weights.argmax(dim=1)  # the first real token, whichever side the padding is on
    longer = weights.sum(dim=1) > 1
    rows = torch.arange(weights.shape[0], device=weights.device)
    weights[rows[longer], first[longer]] = 0.0
    return weights


def embed_prompts(
    model: nn.Module, tokenizer: Any, prompts: list[str], layer: int, *, batch_size: int = 16
) -> Tensor:
    """Embeddings of text prompts, [len(prompts), hidden], in the order given (batched by length)."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[Tensor | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        ids, mask = tokenize(tokenizer, [prompts[i] for i in chosen], device)
        pooled = embed_tokens(model, ids, mask, layer)
        for row, index in enumerate(chosen):
            out[index] = pooled[row]
    return torch.stack([t for t in out if t is not None]) if prompts else torch.zeros(0)


def tokenize(tokenizer: Any, prompts: list[str], device: Any) -> tuple[Tensor, Tensor]:
    """Left-padded input ids and attention mask (padding on the left, as for generation)."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)
