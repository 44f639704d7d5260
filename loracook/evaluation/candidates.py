"""The models one evaluation scores side by side ("candidates"), each a name and a way to open it.

A candidate opens as a context manager that yields ``(model, tokenizer)`` and undoes everything on exit, so
several candidates can share one base model in memory instead of reloading it from disk each time:

- :func:`base_candidate`: the base model as loaded;
- :func:`adapter_candidates`: each PEFT adapter applied on its own to the same in-memory base. Opening one
  wraps the base with PEFT for that adapter only, and closing it unloads the LoRA layers again, so exactly
  one adapter is active and the base is unchanged afterwards (one adapter per wrap, rather than several
  adapters switched with set_adapter, leaves no state shared between candidates, e.g. modules_to_save);
- :func:`model_candidate`: a model already in memory (a merged model), or a merged state dict that is
  swapped into the base's parameters for the duration of the evaluation and swapped back afterwards;
- :func:`folder_candidate`, :func:`adapter_folder_candidate` and :func:`path_candidate`: outputs on disk,
  loaded when opened and freed when closed.

    >>> base = load_model(model_dir)                                   # doctest: +SKIP
    >>> cands = [base_candidate(base), *adapter_candidates(base, {"med": adapter_dir})]  # doctest: +SKIP
    >>> with cands[1].open() as (model, tokenizer): ...                # doctest: +SKIP
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loracook.errors import BadInput

Opened = tuple[Any, Any]  # (transformers model, tokenizer)


@dataclass(frozen=True)
class Candidate:
    """One column of the report: ``kind`` is "base", "adapter" or "model"; ``source`` says where it came from."""

    name: str
    kind: str
    source: str
    open: Callable[[], AbstractContextManager[Opened]] = field(repr=False, compare=False)
    # Makes the lm-eval model from HFLM's keyword arguments (None: HFLM). A router uses its own, which
    # routes each request on its context only (loracook.routing.evaluation).
    lm_class: Callable[..., Any] | None = field(default=None, repr=False, compare=False)


@dataclass
class LoadedModel:
    """A model and its tokenizer, loaded once and shared by several candidates."""

    model: Any
    tokenizer: Any
    source: str


@dataclass(frozen=True)
class AdapterWeights:
    """A PEFT adapter held in memory: its adapter_config.json as a dict and its tensors (PEFT key names)."""

    config: Mapping[str, Any]
    tensors: Mapping[str, Any] = field(repr=False)


def load_model(path: str | Path, *, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load an HF model folder (weights + tokenizer) for evaluation; ``dtype="auto"`` keeps the stored dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise BadInput("not a model folder (no config.json)", file=folder, fix="give an HF model folder")
    tokenizer = load_tokenizer(folder)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype).to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(folder))


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as exc:
        raise BadInput(
            f"cannot load a tokenizer from the folder ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
            file=folder,
            fix="copy the base model's tokenizer files into it",
        ) from None


def base_candidate(base: LoadedModel | str | Path, *, name: str = "base") -> Candidate:
    """The base model: shared if already loaded, else loaded from its folder when opened."""
    if isinstance(base, LoadedModel):
        return Candidate(name, "base", base.source, lambda: _as_is(base.model, base.tokenizer))
    return Candidate(name, "base", str(base), lambda: _from_folder(Path(base)))


def adapter_candidates(
    base: LoadedModel, adapters: Mapping[str, str | Path | AdapterWeights]
) -> list[Candidate]:
    """One candidate per adapter (a folder or :class:`AdapterWeights`), each applied alone to ``base``."""
    out = []
    for name, adapter in adapters.items():
        source = "in memory" if isinstance(adapter, AdapterWeights) else str(adapter)
        out.append(Candidate(name, "adapter", source, _adapter_opener(base, name, adapter)))
    return out


def model_candidate(
    name: str,
    model_or_state_dict: Any,
    *,
    base: LoadedModel | None = None,
    tokenizer: Any = None,
) -> Candidate:
    """A model already in memory, or a full/partial state dict swapped into ``base`` while it is evaluated.

    >>> merged = model_candidate("merged", merged_tensors, base=base)  # doctest: +SKIP
    """
    tokenizer = tokenizer if tokenizer is not None else (base.tokenizer if base is not None else None)
    if tokenizer is None:
        raise ValueError("model_candidate needs a tokenizer (or a base that has one)")
    if isinstance(model_or_state_dict, Mapping):
        if base is None:
            raise ValueError("a state dict candidate needs the base model to swap its tensors into")
        state_dict = model_or_state_dict
        return Candidate(name, "model", "in memory", lambda: _swapped(base, state_dict))
    model = model_or_state_dict
    return Candidate(name, "model", "in memory", lambda: _as_is(model, tokenizer))


def folder_candidate(path: str | Path, *, name: str | None = None, device: str = "cpu") -> Candidate:
    """A model folder on disk, loaded when opened and freed afterwards. A folder without tokenizer files is
    refused here, before any evaluation starts (lm-eval would fail deep inside)."""
    folder = Path(path)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / f).is_file() for f in tokenizer_files):
        raise BadInput(
            "the model folder has no tokenizer files",
            file=folder,
            fix="copy the base model's tokenizer files into it",
        )
    return Candidate(name or folder.name, "model", str(folder), lambda: _from_folder(folder, device))


def adapter_folder_candidate(
    adapter_dir: str | Path,
    base: LoadedModel | str | Path,
    *,
    name: str | None = None,
    device: str = "cpu",
) -> Candidate:
    """A PEFT adapter folder on a base (already loaded, or a folder loaded when opened)."""
    adapter = Path(adapter_dir)
    label = name or adapter.name
    if isinstance(base, LoadedModel):
        return Candidate(label, "adapter", str(adapter), _adapter_opener(base, label, adapter))

    @contextmanager
    def open_() -> Iterator[Opened]:
        with _from_folder(Path(base), device) as (model, tokenizer):
            loaded = LoadedModel(model, tokenizer, str(base))
            with _with_adapter(loaded, label, adapter) as opened:
                yield opened

    return Candidate(label, "adapter", str(adapter), open_)


def path_candidate(
    path: str | Path,
    *,
    base: LoadedModel | str | Path | None = None,
    name: str | None = None,
    device: str = "cpu",
) -> Candidate:
    """An existing output: a model folder, an adapter folder (on ``base``, else on the local folder named
    by its adapter_config.json), or a router folder (on ``base``, else on the one its router.json names).
    For ``loracook eval PATH``."""
    folder = Path(path)
    if (folder / "router.json").is_file():
        from loracook.routing.evaluation import router_candidate

        return router_candidate(folder, base=base, name=name, device=device)
    if (folder / "adapter_config.json").is_file():
        if base is None:
            base = _base_of_adapter(folder)
        return adapter_folder_candidate(folder, base, name=name, device=device)
    if (folder / "config.json").is_file():
        return folder_candidate(folder, name=name, device=device)
    raise BadInput(
        "not a model or adapter folder, nor a router (no config.json, adapter_config.json or router.json)",
        file=folder,
        fix="give a folder written by `loracook run`, an HF model folder or a PEFT adapter folder",
    )


def check_chat_template(
    model_dir: str | Path, *, loc: tuple[str, ...] = ("evaluate", "apply_chat_template")
) -> None:
    """Refuse ``apply_chat_template`` early (before any merge work) when the base's tokenizer has no chat
    template; reads two small files, loads nothing."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    if not config.get("chat_template"):
        raise BadInput(
            f"apply_chat_template is set, but the tokenizer in {folder} has no chat template",
            loc=loc,
            fix="set apply_chat_template: false",
        )


# ---------------------------------------------------------------------------------------------- openers


@contextmanager
def _as_is(model: Any, tokenizer: Any) -> Iterator[Opened]:
    yield model, tokenizer


@contextmanager
def _from_folder(folder: Path, device: str = "cpu") -> Iterator[Opened]:
    loaded = load_model(folder, device=device)
    try:
        yield loaded.model, loaded.tokenizer
    finally:
        del loaded
        gc.collect()


def _adapter_opener(
    base: LoadedModel, name: str, adapter: str | Path | AdapterWeights
) -> Callable[[], AbstractContextManager[Opened]]:
    return lambda: _with_adapter(base, name, adapter)


@contextmanager
def _with_adapter(base: LoadedModel, name: str, adapter: str | Path | AdapterWeights) -> Iterator[Opened]:
    """Wrap ``base.model`` with this one adapter, yield the wrapped transformers model, then unload it."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict

    model = base.model
    if hasattr(model, "peft_config"):
        raise RuntimeError("the base model already carries PEFT adapters; evaluate candidates one at a time")
    if isinstance(adapter, AdapterWeights):
        config = PeftConfig.from_peft_type(**dict(adapter.config))
        config.inference_mode = True
        peft_model = PeftModel(model, config, adapter_name=name)
        result = set_peft_model_state_dict(peft_model, dict(adapter.tensors), adapter_name=name)
        if result.unexpected_keys:
            peft_model.unload()
            _forget_peft(model)
            raise ValueError(f"adapter {name!r} has tensors the base lacks: {result.unexpected_keys[:3]}")
    else:
        folder = Path(adapter)
        if not (folder / "adapter_config.json").is_file():
            raise BadInput("not a PEFT adapter folder (no adapter_config.json)", file=folder)
        peft_model = PeftModel.from_pretrained(model, str(folder), adapter_name=name, is_trainable=False)
    peft_model.to(_device_of(model)).eval()
    try:
        yield peft_model.get_base_model(), base.tokenizer
    finally:
        peft_model.unload()  # puts the original modules back, without merging anything into them
        _forget_peft(model)


def _forget_peft(model: Any) -> None:
    # PEFT leaves bookkeeping on the unwrapped model; drop it so the next wrap starts clean.
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in vars(model):
            delattr(model, attribute)


@contextmanager
def _swapped(base: LoadedModel, state_dict: Mapping[str, Any]) -> Iterator[Opened]:
    """Point the base's parameters at the given tensors, and back at the originals afterwards (no copies
    of the originals are made; tied parameters are one object, so they stay tied)."""
    import torch

    model = base.model
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    unknown = [key for key in state_dict if key not in named]
    if unknown:
        raise KeyError(f"the merged state dict has tensors the base model lacks: {unknown[:3]}")
    saved: dict[int, tuple[Any, Any]] = {}
    try:
        with torch.no_grad():
            for key, value in state_dict.items():
                target = named[key]
                if tuple(value.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{key}: merged shape {tuple(value.shape)} != base {tuple(target.shape)}"
                    )
                saved.setdefault(id(target), (target, target.data))
                target.data = value.to(device=target.device, dtype=target.dtype)
        yield model, base.tokenizer
    finally:
        for target, data in saved.values():
            target.data = data


def _device_of(model: Any) -> Any:
    return next(model.parameters()).device


def _base_of_adapter(folder: Path) -> Path:
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadInput(f"cannot read adapter_config.json: {exc}", file=folder) from None
    named = config.get("base_model_name_or_path")
    if named and (Path(named) / "config.json").is_file():
        return Path(named)
    raise BadInput(
        f"the adapter's base {named!r} is not a local model folder",
        file=folder / "adapter_config.json",
        fix="give the base model folder explicitly (--base)",
    )
