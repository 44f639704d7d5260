"""Batched greedy generation for `loracook generate` and the study: a router, a model or an adapter alike."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    stop: str | None = None,
) -> list[dict[str, Any]]:
    """Greedy completions of ``prompts``, batched (left padding); for a routed model each row also carries
    the router's ``weights`` ({source: w}) and ``top`` source. ``stop`` cuts each completion at that text."""
    from loracook.routing.embed import tokenize

    router = getattr(model, "router", None)
    device = next(model.parameters()).device
    results: list[dict[str, Any]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        ids, mask = tokenize(tokenizer, chunk, device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
        explained = router.explain(router.last_weights) if router is not None else [{}] * len(chunk)
        for prompt, text, info in zip(chunk, texts, explained, strict=True):
            if stop is not None and stop in text:
                text = text[: text.index(stop)]
            results.append({"prompt": prompt, "completion": text, **info})
    return results
