"""Scoring a router with lm-eval: the candidate, and an HFLM that routes each request on its context only.

lm-eval scores a multiple-choice or loglikelihood request by one forward pass over context + continuation.
Routed on that whole row, each option of a question would get its own weights, so the options would be
scored by different models. :class:`RoutedHFLM` routes each row on its context alone (the part before the
continuation) and pins those weights for the scoring pass. Generation requests need nothing special: the
router decides at the prefill, which holds only the context. Arrow routes per token and causally (a token's
weights depend on the tokens up to it), so its scoring pass is already what generation would compute.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["routed_lm", "router_candidate"]


def routed_lm(**kwargs: Any) -> Any:
    """A :class:`RoutedHFLM` (HFLM's keyword arguments); the model must carry a router."""
    return _routed_class()(**kwargs)


@lru_cache(maxsize=1)
def _routed_class() -> type:
    from lm_eval.models.huggingface import HFLM

    class RoutedHFLM(HFLM):
        """HFLM whose loglikelihood rows are routed on their context only (see the module docstring)."""

        _contexts: dict[tuple[int, ...], int] | None = None

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):  # type: ignore[override]
            contexts: dict[tuple[int, ...], int] = {}
            for _, context, continuation in requests:
                whole = (context + continuation)[-(self.max_length + 1) :]
                dropped = len(context) + len(continuation) - len(whole)
                contexts[tuple(whole[:-1])] = max(len(context) - dropped, 1)
            self._contexts, self._lengths = contexts, sorted({len(k) for k in contexts}, reverse=True)
            try:
                return super()._loglikelihood_tokens(
                    requests, disable_tqdm=disable_tqdm, override_bs=override_bs
                )
            finally:
                self._contexts = None

        def _model_call(self, inps, attn_mask=None, labels=None):  # type: ignore[override]
            router = getattr(self.model, "router", None)
            if router is None or router.method == "arrow" or not self._contexts:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            prompts = [self._context_of(row) for row in inps.tolist()]
            weights = router.decide_tokens(prompts)
            with router.fixed(weights):
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

        def _context_of(self, row: list[int]) -> list[int]:
            """The context part of a right-padded row: the row lm-eval built for a known request."""
            assert self._contexts is not None
            for length in self._lengths:
                if length <= len(row) and not any(row[length:]):
                    found = self._contexts.get(tuple(row[:length]))
                    if found is not None:
                        return row[:found]
            return row  # not a request of this call (cannot happen): route on the whole row

    return RoutedHFLM


def router_candidate(
    folder: str | Path, *, base: Any = None, name: str | None = None, device: str = "cpu"
) -> Any:
    """An evaluation candidate for a router folder: the router attached to ``base`` (a shared
    :class:`~loracook.evaluation.LoadedModel`, or a model folder loaded when opened; by default the base
    router.json names), scored through :class:`RoutedHFLM`, and detached afterwards."""
    from loracook.evaluation.candidates import Candidate, LoadedModel, load_model
    from loracook.routing.artifact import read_spec
    from loracook.routing.model import attach_router, base_folder

    folder = Path(folder)
    spec = read_spec(folder)  # refuse a broken router now, before any model is loaded
    label = name or folder.name

    @contextmanager
    def open_() -> Iterator[tuple[Any, Any]]:
        if isinstance(base, LoadedModel):
            loaded, own = base, False
        else:
            loaded, own = (
                load_model(Path(base) if base is not None else base_folder(spec, folder), device=device),
                True,
            )
        router = attach_router(loaded.model, folder, tokenizer=loaded.tokenizer)
        try:
            yield loaded.model, loaded.tokenizer
        finally:
            router.detach()
            if own:
                del loaded

    return Candidate(label, "router", str(folder), open_, lm_class=routed_lm)
