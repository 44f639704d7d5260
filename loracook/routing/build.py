"""Build a router folder's contents from its sources (plain PEFT adapters) and the route settings.

Called by the output kind `router` (loracook/outputs/router.py) on the output's temporary folder, so the
folder appears atomically with the rest of the output, or not at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from loracook import __version__
from loracook.errors import BadInput
from loracook.routing import methods
from loracook.routing.artifact import ADAPTERS, TENSORS_FILE, RouterSpec
from loracook.routing.prompts import read_prompts


def copy_adapter(source: Path, target: Path) -> None:
    """Write a source adapter as a plain PEFT adapter folder (config and tensors as they are; a weights-only
    .bin becomes safetensors), through io/peft."""
    from loracook.io.peft import adapter_weights_file, read_adapter_config, save_adapter

    config = read_adapter_config(source)
    file = adapter_weights_file(source)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(file)
    else:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    target.mkdir(parents=True, exist_ok=True)
    save_adapter(target, {k: v.contiguous() for k, v in tensors.items()}, config)


def load_factors(folder: Path, name: str, origin: Path | None = None) -> dict:
    """{module: LoraFactors} of an adapter folder; an adapter the mixture cannot weight is bad input."""
    from loracook.mixture import load_peft_factors

    try:
        return load_peft_factors(folder)
    except ValueError as exc:
        raise BadInput(
            f"source {name!r} cannot be routed: {str(exc).split(': ', 1)[-1]}",
            file=origin or folder,
            loc=("sources", name),
            fix="a router weights plain LoRA factors; merge this source into a model instead",
        ) from None


def build_router(
    folder: Path,
    *,
    adapters: Mapping[str, Path],
    route: Any,
    base_folder: Path,
    base_spec: Mapping[str, Any],
    num_layers: int,
) -> RouterSpec:
    """Write ``adapters/``, router.safetensors and router.json into ``folder``; returns the spec written.

    ``route`` is the recipe's `route:` section (method, exemplars, top_k, temperature, layer, seed).
    """
    folder = Path(folder)
    names = tuple(adapters)
    factors = {}
    for name, source in adapters.items():
        target = folder / ADAPTERS / name
        copy_adapter(Path(source), target)
        factors[name] = load_factors(target, name, Path(source))
    exemplars: dict[str, int] = {}
    stats: dict[str, Any] = {}
    layer = None
    hidden_size = None
    if route.method == "arrow":
        tensors = _arrow_tensors(folder, names, factors)
    else:
        layer = route.layer if route.layer is not None else _default_layer(num_layers)
        prompts = {n: read_prompts(route.exemplars[n], what=f"exemplar file of source {n!r}") for n in names}
        exemplars = {n: len(p) for n, p in prompts.items()}
        embeddings = _embed_exemplars(base_folder, prompts, layer)
        hidden_size = int(embeddings[0].shape[1])
        if route.method == "centroid":
            tensors = methods.fit_centroid(embeddings)
            scores = [methods.centroid_scores(e, tensors) for e in embeddings]
        else:
            tensors = methods.fit_gate(embeddings, route.seed)
            scores = [methods.gate_scores(e, tensors) for e in embeddings]
        hits = sum(int((s.argmax(dim=-1) == i).sum()) for i, s in enumerate(scores))
        stats["exemplar_accuracy"] = round(hits / sum(exemplars.values()), 4)
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / TENSORS_FILE), metadata={"format": "pt"}
    )
    spec = RouterSpec(
        method=route.method,
        sources=names,
        top_k=route.top_k,
        temperature=float(route.temperature),
        layer=layer,
        base={**dict(base_spec), "num_layers": num_layers, "hidden_size": hidden_size},
        seed=route.seed,
        exemplars=exemplars,
        stats=stats,
        loracook_version=__version__,
    )
    (folder / "router.json").write_text(spec.to_json(), encoding="utf-8")
    return spec


def _default_layer(num_layers: int) -> int:
    from loracook.routing.embed import default_layer

    return default_layer(num_layers)


def _arrow_tensors(
    folder: Path, names: tuple[str, ...], factors: Mapping[str, dict]
) -> dict[str, torch.Tensor]:
    from loracook.io.peft import open_adapter

    for name in names:
        modules = open_adapter(folder / ADAPTERS / name).modules
        embedded = [m for m, info in modules.items() if info.kind == "embedding"]
        if embedded:
            raise BadInput(
                f"route.method arrow routes the inputs of linear layers, but source {name!r} adapts the "
                f"embedding {embedded[0]}",
                loc=("route", "method"),
                fix="use method centroid or gate for this source",
            )
    pairs = [{m: (f.b, f.a) for m, f in factors[name].items()} for name in names]
    tensors: dict[str, torch.Tensor] = {}
    for module, (protos, present) in methods.arrow_prototypes(pairs).items():
        tensors[f"arrow.{module}.prototypes"] = protos
        tensors[f"arrow.{module}.present"] = present.to(torch.uint8)
    return tensors


def _embed_exemplars(base_folder: Path, prompts: Mapping[str, list[str]], layer: int) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from loracook.evaluation.candidates import load_tokenizer
    from loracook.routing.embed import embed_prompts

    tokenizer = load_tokenizer(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()
    try:
        return [embed_prompts(model, tokenizer, p, layer) for p in prompts.values()]
    finally:
        del model
