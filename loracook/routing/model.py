"""A router on a live transformers causal LM: ``model.router`` decides, the LoRA mixture applies.

:func:`attach_router` hooks a loaded base model with the router folder's adapters (one
:class:`~loracook.mixture.LoraMixture`, exact y = W x + Σ c_i s_i B_i A_i x) and a forward pre-hook on the
model itself. Whenever the model starts a new sequence (a forward pass without a filled KV cache: the prefill
of ``generate``, or a plain ``model(ids)`` call), the hook routes every row of the batch on its own prompt:

* ``centroid`` / ``gate``: the base model's embedding of the prompt (loracook.routing.embed, the adapters
  switched off for that pass) gives one weight vector per row, kept for the rest of that generation;
* ``arrow``: nothing to decide up front; every adapted module weights its sources per token from its own
  input (PEFT's Arrow rule), during the prefill and every decoding step.

The model stays a transformers model (``generate``, lm-eval's HFLM, ``model(ids).logits`` all work);
``model.router.last_weights`` holds the weights of the last routed batch, [batch, n] (for arrow: the mean over
the adapted modules and the prompt's tokens), and ``model.router.fixed(w)`` pins the weights instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from loracook.errors import BadInput
from loracook.routing import methods
from loracook.routing.artifact import REBUILD, TENSORS_FILE, RouterSpec, read_spec

__all__ = ["Router", "attach_router", "base_folder", "load_router"]


class Router:
    """The routing state of a model that carries a router (``model.router``); made by :func:`attach_router`."""

    def __init__(
        self,
        model: nn.Module,
        folder: Path,
        spec: RouterSpec,
        tensors: Mapping[str, Tensor],
        factors: Mapping[str, Mapping[str, Any]],
        tokenizer: Any = None,
    ) -> None:
        from loracook.mixture import LoraMixture

        self.model, self.folder, self.spec, self.tokenizer = model, Path(folder), spec, tokenizer
        self.names: tuple[str, ...] = spec.sources
        weight = next(model.parameters())
        self.device = weight.device
        self.tensors = {k: v.to(self.device) for k, v in tensors.items()}
        try:
            # Arrow follows PEFT's unmerged forward (a LoRA on a tied head adapts the head only); the exemplar
            # routers follow the merged model, as `loracook run` writes it.
            self.mixture = LoraMixture(model, factors, tied_output=spec.method != "arrow")
        except ValueError as exc:
            raise BadInput(
                f"the router's adapters do not fit this model: {exc}", file=folder, fix=REBUILD
            ) from None
        self.last_weights: Tensor | None = None
        self._fixed: Tensor | None = None
        self._record: dict[str, Any] | None = None
        self._busy = False
        self._protos: dict[str, tuple[Tensor, Tensor]] = {}
        if spec.method == "arrow":
            for key, value in self.tensors.items():
                if key.endswith(".prototypes"):
                    module = key.removeprefix("arrow.").removesuffix(".prototypes")
                    present = self.tensors[f"arrow.{module}.present"].to(torch.bool)
                    self._protos[module] = (value.to(weight.dtype), present)
        self.mixture.attach()
        self._follow_rule()
        self._handles = [
            model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            model.register_forward_hook(self._post_hook, with_kwargs=True),
        ]
        model.router = self

    # -- what the router is -----------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def n(self) -> int:
        return len(self.names)

    def adapter_dir(self, source: str) -> Path:
        """The plain PEFT adapter of a source (what a vLLM LoRARequest or PEFT adapter_names can load)."""
        return self.spec.adapter_dir(self.folder, source)

    def detach(self) -> None:
        """Remove every hook and the mixture: the model is exactly the base again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.mixture.detach()
        if getattr(self.model, "router", None) is self:
            del self.model.router

    # -- deciding ---------------------------------------------------------------------------------------

    @torch.no_grad()
    def decide(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The weights [batch, n] for prompts given as token ids (each row on its own; padding masked).

        Centroid and gate embed the prompts with the base model; arrow runs one forward pass and returns the
        mean of its per-token, per-module weights over the modules and the prompt's tokens.
        """
        if self.method == "arrow":
            with self._pinned(None):
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            assert self.last_weights is not None
            return self.last_weights
        from loracook.routing.embed import embed_tokens

        fixed, self._busy = self._fixed, True
        self.mixture.set(None)  # the base model decides, whatever the adapters would do
        try:
            x = embed_tokens(self.model, input_ids, attention_mask, self.spec.layer or 0)
        finally:
            self._busy = False
            if fixed is not None:
                self.mixture.set(fixed)
        if self.method == "centroid":
            scores = methods.centroid_scores(x, self.tensors)
        else:
            scores = methods.gate_scores(x, self.tensors)
        return methods.top_k_softmax(scores, self.spec.top_k, self.spec.temperature)

    def decide_tokens(self, prompts: Sequence[Sequence[int]]) -> Tensor:
        """:meth:`decide` for token-id lists of different lengths (left-padded here)."""
        longest = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), longest, dtype=torch.long)
        mask = torch.zeros(len(prompts), longest, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            if prompt:
                ids[row, longest - len(prompt) :] = torch.as_tensor(list(prompt))
                mask[row, longest - len(prompt) :] = 1
        return self.decide(ids.to(self.device), mask.to(self.device))

    def weights(self, prompts: Sequence[str], *, batch_size: int = 16) -> Tensor:
        """The weights [len(prompts), n] the router gives text prompts (tokenized as ``generate`` would)."""
        from loracook.routing.embed import tokenize

        if self.tokenizer is None:
            raise ValueError("this router was attached without a tokenizer; pass token ids to decide()")
        rows = []
        for start in range(0, len(prompts), batch_size):
            ids, mask = tokenize(self.tokenizer, list(prompts[start : start + batch_size]), self.device)
            rows.append(self.decide(ids, mask).cpu())
        return torch.cat(rows) if rows else torch.zeros(0, self.n)

    def explain(self, weights: Tensor) -> list[dict[str, Any]]:
        """One ``{"weights": {source: w}, "top": source}`` per row of a [batch, n] weight tensor."""
        out = []
        for row in weights.tolist():
            top = max(range(self.n), key=lambda i: row[i])
            out.append(
                {
                    "weights": {n: round(w, 6) for n, w in zip(self.names, row, strict=True)},
                    "top": self.names[top],
                }
            )
        return out

    # -- pinning the weights ----------------------------------------------------------------------------

    def fix(self, weights: Tensor | Sequence[float] | Mapping[str, float] | None) -> None:
        """Pin the weights ([n] for every row, [batch, n] per row, or {source: w}); None routes again."""
        if weights is None:
            self._fixed = None
            self._follow_rule()
            return
        if isinstance(weights, Mapping):
            weights = [float(weights[n]) for n in self.names]
        pinned = torch.as_tensor(weights, dtype=torch.float32)
        self.mixture.set(pinned)
        self._fixed = pinned

    @contextmanager
    def fixed(self, weights: Tensor | Sequence[float] | Mapping[str, float]) -> Iterator[None]:
        """Within the block every forward pass uses these weights instead of routing."""
        with self._pinned(weights):
            yield

    @contextmanager
    def _pinned(self, weights: Any) -> Iterator[None]:
        before = self._fixed
        self.fix(weights)
        try:
            yield
        finally:
            self.fix(before)

    def _follow_rule(self) -> None:
        if self.method == "arrow":
            self.mixture.route(self._arrow)
        else:
            self.mixture.set(None)

    # -- hooks ------------------------------------------------------------------------------------------

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._busy or _decoding(kwargs):
            return
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        mask = kwargs.get("attention_mask")
        if self._fixed is not None:
            rows = ids.shape[0] if ids is not None else 1
            fixed = self._fixed
            self.last_weights = (fixed.expand(rows, -1) if fixed.dim() == 1 else fixed).detach().cpu()
            return
        if self.method == "arrow":
            if ids is not None:
                shape = ids.shape[:2]
                token_mask = (
                    mask if mask is not None and mask.shape == shape else torch.ones(shape, device=ids.device)
                )
                self._record = {"mask": token_mask.to(torch.float32), "sum": None, "count": 0}
            return
        if ids is None:
            raise ValueError("a routed model routes on input_ids; it cannot route inputs_embeds alone")
        weights = self.decide(ids, mask)
        self.mixture.set(weights)
        self.last_weights = weights.detach().cpu()

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        record, self._record = self._record, None
        if record is not None and record["count"]:
            self.last_weights = (record["sum"] / record["count"]).detach().cpu()

    def _arrow(self, module: str, x: Tensor) -> Tensor:
        found = self._protos.get(module)
        if found is None:
            return x.new_zeros(*x.shape[:-1], self.n)
        prototypes, present = found
        weights = methods.arrow_weights(x, prototypes, present, self.spec.top_k, self.spec.temperature)
        record = self._record
        if record is not None and weights.dim() == 3 and weights.shape[:2] == record["mask"].shape:
            mask = record["mask"].unsqueeze(-1)
            mean = (weights.to(torch.float32) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            record["sum"] = mean if record["sum"] is None else record["sum"] + mean
            record["count"] += 1
        return weights


def _decoding(kwargs: dict) -> bool:
    """True when the forward pass continues a sequence (a filled KV cache): keep this sequence's weights.
    (transformers passes the cache as ``past_key_values``, or ``cache`` in recent versions.)"""
    for key in ("past_key_values", "cache"):
        past = kwargs.get(key)
        if past is None:
            continue
        length = past.get_seq_length() if hasattr(past, "get_seq_length") else _legacy_length(past)
        if length > 0:
            return True
    position = kwargs.get("cache_position")
    return position is not None and position.numel() > 0 and int(position.reshape(-1)[0]) > 0


def _legacy_length(past: Any) -> int:
    try:
        return int(past[0][0].shape[-2])
    except (IndexError, TypeError, AttributeError):
        return 0


# ---------------------------------------------------------------------------------------------- loading


def attach_router(model: nn.Module, folder: str | Path, *, tokenizer: Any = None) -> Router:
    """Hook a loaded base model with the router in ``folder``; the model gets ``model.router``.

    Call ``model.router.detach()`` to get the plain base model back.
    """
    from loracook.routing.build import load_factors

    folder = Path(folder)
    spec = read_spec(folder)
    if getattr(model, "router", None) is not None:
        raise ValueError("this model already carries a router; detach it first")
    _check_model(model, spec, folder)
    tensors = _read_tensors(folder, spec)
    factors = {name: load_factors(spec.adapter_dir(folder, name), name) for name in spec.sources}
    return Router(model, folder, spec, tensors, factors, tokenizer)


def load_router(
    path: str | Path, *, base: str | Path | None = None, device: str = "cpu", dtype: Any = torch.float32
) -> nn.Module:
    """A router folder as a transformers causal LM: the base model (``base``, or the one router.json names)
    with the router attached. ``model.router`` holds the router (``tokenizer``, ``last_weights``, ``fixed``).

    >>> model = load_router("out/skills-router")                              # doctest: +SKIP
    >>> tok = model.router.tokenizer                                           # doctest: +SKIP
    >>> out = model.generate(**tok(["Rewrite as a headline: a cat naps"], return_tensors="pt"))  # doctest: +SKIP
    >>> model.router.last_weights                                              # doctest: +SKIP
    """
    from transformers import AutoModelForCausalLM

    from loracook.evaluation.candidates import load_tokenizer

    spec = read_spec(path)
    folder = Path(base) if base is not None else base_folder(spec, Path(path))
    if not (folder / "config.json").is_file():
        raise BadInput(
            "the router's base is not a model folder (no config.json)", file=folder, fix="pass base="
        )
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    attach_router(model, path, tokenizer=tokenizer)
    return model


def base_folder(spec: RouterSpec, folder: Path) -> Path:
    """The base model folder router.json names (re-resolved from the recipe's base spec if it moved)."""
    path = spec.base.get("path")
    if path and (Path(path) / "config.json").is_file():
        return Path(path)
    given = spec.base.get("spec")
    if isinstance(given, dict) and given.get("path"):
        from loracook.plan.compile import load_base
        from loracook.recipe.model import BaseSpec

        return load_base(BaseSpec(**given)).path
    raise BadInput(
        f"the router's base model {path!r} is not there",
        file=folder / "router.json",
        fix="pass --base / base=",
    )


def _check_model(model: nn.Module, spec: RouterSpec, folder: Path) -> None:
    from loracook.routing.embed import num_layers

    layers, want = num_layers(model), spec.base.get("num_layers")
    if want is not None and layers != want:
        raise BadInput(
            f"the router was built for a base with {want} layers; this model has {layers}",
            file=folder,
            fix="use the base model the router was built on",
        )


def _read_tensors(folder: Path, spec: RouterSpec) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = folder / TENSORS_FILE
    try:
        tensors = load_file(file)
    except (SafetensorError, OSError) as exc:
        raise BadInput(f"{TENSORS_FILE} cannot be read ({exc})", file=file, fix=REBUILD) from None
    needed = {"centroid": ("center", "centroids"), "gate": ("mean", "std", "w1", "b1", "w2", "b2")}
    missing = [k for k in needed.get(spec.method, ()) if k not in tensors]
    if spec.method == "arrow" and not any(k.endswith(".prototypes") for k in tensors):
        missing = ["arrow.*.prototypes"]
    if missing:
        raise BadInput(f"{TENSORS_FILE} lacks {', '.join(missing)}", file=file, fix=REBUILD)
    n = len(spec.sources)
    rows = (
        tensors["centroids"].shape[0]
        if spec.method == "centroid"
        else (tensors["w2"].shape[0] if spec.method == "gate" else n)
    )
    if rows != n:
        raise BadInput(f"{TENSORS_FILE} is for {rows} sources, router.json names {n}", file=file, fix=REBUILD)
    return tensors
