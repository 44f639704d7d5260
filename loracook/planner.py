"""Build a :class:`~loracook.plan.Plan` from a recipe, reading only configs and tensor headers."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from loracook.errors import BadInput, Unsupported
from loracook.io.adapter import Adapter, LoraModule, open_adapter
from loracook.io.checkpoint import Checkpoint, open_checkpoint
from loracook.io.resolve import gguf_to_folder, resolve_path
from loracook.plan import (
    EXACT_METHODS,
    BiasTerm,
    Combine,
    Dare,
    FullTerm,
    LoraTerm,
    ModuleTask,
    Plan,
    TensorTask,
    Term,
)
from loracook.recipe.model import AdapterSource, ExtractSource, Recipe
from loracook.weights import check_weight, weight_for

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_base(recipe: Recipe) -> Checkpoint:
    spec = recipe.base_spec
    try:
        folder = resolve_path(spec.path, revision=spec.revision, kind="base model")
        if spec.gguf_file:
            folder = gguf_to_folder(folder, spec.gguf_file)
        return open_checkpoint(folder)
    except BadInput as error:
        error.loc = error.loc or ("base",)
        raise


def load_sources(
    recipe: Recipe, base: Checkpoint, extracted: dict[str, Path] | None = None
) -> tuple[dict[str, Adapter], list[str]]:
    """Open every source's headers. An extract source not yet extracted becomes a virtual adapter at its
    maximum rank (what `plan` and `validate` show); returns the adapters and the extraction summaries."""
    from loracook.extraction import describe, plan_extraction, virtual_adapter

    adapters: dict[str, Adapter] = {}
    notes: list[str] = []
    for name, source in recipe.sources.items():
        try:
            if isinstance(source, ExtractSource):
                if extracted and name in extracted:
                    adapters[name] = open_adapter(extracted[name])
                    continue
                job = plan_extraction(
                    name, source.extract, base, resolve_path(source.extract.model, kind="fine-tune")
                )
                adapters[name] = virtual_adapter(job)
                notes.append(describe(job))
                continue
            path = source.adapter if isinstance(source, AdapterSource) else source
            adapters[name] = open_adapter(resolve_path(path, kind="adapter"))
        except BadInput as error:
            error.loc = error.loc or ("sources", name)
            raise
    return adapters, notes


def make_plan(recipe: Recipe, output: Path | None = None, extracted: dict[str, Path] | None = None) -> Plan:
    """Check the recipe against the files' headers and build the task list.

    >>> plan = make_plan(load_recipe("recipes/demo.yaml").recipe)  # doctest: +SKIP
    >>> len(plan.tasks), plan.bytes_written  # doctest: +SKIP
    """
    out = output or (Path(recipe.output.path) if recipe.output.path else None)
    if out is None:
        raise BadInput(
            "no output path", loc=("output",), fix="set output.path in the recipe or pass --output"
        )
    combine = _combine(recipe)
    _check_method_options(recipe, combine)
    base = load_base(recipe)
    sources, notes = load_sources(recipe, base, extracted)
    for name, spec in recipe.merge.weights.items():
        check_weight(spec, base.num_layers, name)
    terms = _collect_terms(recipe, base, sources)
    if recipe.output.kind == "model":
        plan = _model_plan(recipe, out, base, sources, terms, combine)
    else:
        plan = _adapter_plan(recipe, out, base, sources, terms, combine)
    return replace(plan, notes=tuple(notes))


def _combine(recipe: Recipe) -> Combine:
    merge = recipe.merge
    density = getattr(merge, "density", 1.0)
    names = list(recipe.sources)
    densities = tuple((n, float(density[n] if isinstance(density, dict) else density)) for n in names)
    return Combine(
        method=merge.method,
        rank=getattr(merge, "rank", None),
        densities=densities,
        majority_sign=getattr(merge, "majority_sign", "total"),
        rescale=getattr(merge, "rescale", False),
        seed=merge.seed,
    )


def _check_method_options(recipe: Recipe, combine: Combine) -> None:
    kind = recipe.output.kind
    dared = [n for n, s in recipe.sources.items() if not isinstance(s, str) and s.dare is not None]
    if kind == "model" and combine.method in EXACT_METHODS and combine.rank is not None:
        raise BadInput(
            f"merge.rank has no effect for {combine.method} into a model (the sum is exact)",
            loc=("merge", "rank"),
            fix="remove it, or use method svd for a low-rank merge",
        )
    if kind == "adapter" and combine.rank is None and (combine.dense or dared):
        what = f"method {combine.method}" if combine.dense else f"DARE on source {dared[0]!r}"
        raise BadInput(
            f"{what} makes dense deltas; an adapter output needs merge.rank to recompress them",
            loc=("merge",),
            fix="add merge.rank (e.g. 64)",
        )


def _dare_of(recipe: Recipe, source: str) -> Dare | None:
    spec = recipe.sources[source]
    if isinstance(spec, str) or spec.dare is None:
        return None
    seed = spec.dare.seed if spec.dare.seed is not None else recipe.merge.seed
    return Dare(drop=spec.dare.drop, rescale=spec.dare.rescale, seed=seed)


# ------------------------------------------------------------------------------------------------ terms


def _embedding_name(base: Checkpoint) -> str | None:
    for name in base.tensors:
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
            return name
    return None


def _target(base: Checkpoint, name: str) -> str | None:
    """The base tensor an adapter tensor applies to; lm_head goes to the embedding when they are tied."""
    if name in base.tensors:
        return name
    if name == "lm_head.weight" and base.tied_embeddings:
        return _embedding_name(base)
    return None


def _collect_terms(recipe: Recipe, base: Checkpoint, sources: dict[str, Adapter]) -> dict[str, list[Term]]:
    """Every source's terms, keyed by the base tensor they change; all mismatches are reported at once."""
    terms: dict[str, list[Term]] = {}
    problems: list[tuple[str, str]] = []
    layers = base.num_layers

    def weight(source: str, name: str) -> float:
        try:
            return weight_for(recipe.merge.weights.get(source, 1.0), name, layers, source)
        except BadInput as error:
            problems.append((source, error.message))
            return 0.0

    for source, adapter in sources.items():
        dare = _dare_of(recipe, source)
        for module in adapter.modules.values():
            problem = _check_module(base, module)
            if problem:
                problems.append((source, problem))
                continue
            target = _target(base, module.weight_name)
            assert target is not None
            w = weight(source, target)
            transposed = module.kind == "embedding" or module.fan_in_fan_out
            terms.setdefault(target, []).append(
                LoraTerm(source, w, module.a, module.b, module.scale, transposed, module.magnitude, dare)
            )
            if module.bias is not None:
                terms.setdefault(f"{module.module}.bias", []).append(
                    BiasTerm(source, w, module.bias, module.scale, dare)
                )
        for name, info in adapter.full.items():
            target = _target(base, name)
            if target is None:
                problems.append((source, f"{name} (saved in full) is not in the base"))
            elif base.tensors[target].shape != info.shape:
                what = (
                    "vocabulary sizes differ" if "embed" in target or "lm_head" in name else "shapes differ"
                )
                problems.append(
                    (
                        source,
                        f"{name}: {what}, adapter {list(info.shape)} vs base {list(base.tensors[target].shape)}",
                    )
                )
            else:
                terms.setdefault(target, []).append(FullTerm(source, weight(source, target), info, dare))
    if problems:
        source = problems[0][0]
        mine = [p for s, p in problems if s == source]
        shown = "; ".join(mine[:8]) + (f"; and {len(mine) - 8} more" if len(mine) > 8 else "")
        raise BadInput(
            f"adapter {source!r} does not fit the base model ({len(mine)} problem{'s' if len(mine) > 1 else ''}): "
            + shown,
            file=sources[source].file,
            loc=("sources", source),
            fix="was it trained on this base? check `base:`",
        )
    return terms


def _check_module(base: Checkpoint, module: LoraModule) -> str | None:
    target = _target(base, module.weight_name)
    if target is None:
        return f"module {module.module} is not in the base"
    shape = base.tensors[target].shape
    if len(shape) != 2:
        return f"module {module.module} is {len(shape)}-D in the base, not a linear layer"
    if tuple(shape) != module.delta_shape:
        return f"module {module.module} has shape {list(module.delta_shape)} but the base has {list(shape)}"
    if module.magnitude is not None:
        out = shape[1] if module.fan_in_fan_out else shape[0]
        if module.magnitude.shape != (out,):
            return f"module {module.module}: DoRA magnitude has shape {list(module.magnitude.shape)}, expected [{out}]"
    if module.bias is not None:
        bias = base.tensors.get(f"{module.module}.bias")
        if bias is None:
            return f"module {module.module} has lora_bias but the base layer has no bias"
        if bias.shape != module.bias.shape:
            return f"module {module.module}: lora bias shape {list(module.bias.shape)} vs base {list(bias.shape)}"
    return None


# ------------------------------------------------------------------------------------------------ plans


def _model_plan(
    recipe: Recipe,
    out: Path,
    base: Checkpoint,
    sources: dict[str, Adapter],
    terms: dict[str, list[Term]],
    combine: Combine,
) -> Plan:
    dtype_name = recipe.output.dtype
    tasks = []
    for name, info in sorted(base.tensors.items(), key=lambda kv: (kv[1].file, kv[1].offset or 0, kv[0])):
        dtype = info.dtype
        if dtype_name != "auto" and info.dtype.is_floating_point:
            dtype = _DTYPES[dtype_name]
        tasks.append(
            TensorTask(name=name, base=info, dtype=dtype, terms=tuple(terms.get(name, ())), combine=combine)
        )
    return Plan(
        kind="model",
        output=out,
        tasks=tuple(tasks),
        shard_size=recipe.output.shard_size,
        base=base,
        method=combine.method,
        sources=sources,
        copy_files=tuple(base.copy_files()),
    )


def _adapter_plan(
    recipe: Recipe,
    out: Path,
    base: Checkpoint,
    sources: dict[str, Adapter],
    terms: dict[str, list[Term]],
    combine: Combine,
) -> Plan:
    for name, adapter in sources.items():
        if adapter.uses_dora:
            raise Unsupported(
                f"source {name!r} is a DoRA adapter: its change depends on the base weights and is not a LoRA",
                loc=("sources", name),
                fix="merge it into a model (output.kind: model) instead",
            )
    fifo = {bool(a.config.get("fan_in_fan_out", False)) for a in sources.values() if a.modules}
    if len(fifo) > 1:
        raise BadInput(
            "the sources disagree on fan_in_fan_out: were they made for the same base?", loc=("sources",)
        )
    dtype = torch.float32 if recipe.output.dtype == "auto" else _DTYPES[recipe.output.dtype]
    tasks: list[ModuleTask | TensorTask] = []
    has_bias = any(isinstance(t, BiasTerm) for found in terms.values() for t in found)
    for name in sorted(terms, key=lambda n: (base.tensors[n].file, base.tensors[n].offset or 0, n)):
        found = terms[name]
        loras = tuple(t for t in found if isinstance(t, LoraTerm))
        if loras:
            module = name.removesuffix(".weight")
            tasks.append(_module_task(module, loras, base, combine, dtype, sources))
        # Copies of embedding layers that PEFT saves next to an embedding LoRA are the base's own weights.
        fulls = [
            t
            for t in found
            if isinstance(t, FullTerm) and t.tensor.name not in sources[t.source].base_layer_copies
        ]
        if fulls:
            tasks.append(
                TensorTask(
                    name,
                    base.tensors[name],
                    dtype,
                    tuple(fulls),
                    combine,
                    out_name=f"base_model.model.{name}",
                )
            )
    if has_bias:
        raise Unsupported(
            "lora_bias sources in an adapter output are not supported yet",
            loc=("sources",),
            fix="merge them into a model (output.kind: model)",
        )
    config = _adapter_config(recipe, base, sources, tasks)
    return Plan(
        kind="adapter",
        output=out,
        tasks=tuple(tasks),
        shard_size=recipe.output.shard_size,
        base=base,
        method=combine.method,
        sources=sources,
        adapter_config=config,
    )


def _module_task(
    module: str, loras: tuple[LoraTerm, ...], base: Checkpoint, combine: Combine, dtype: torch.dtype, sources
) -> ModuleTask:
    embedding = any(".lora_embedding" in t.a.name for t in loras)
    out_features, in_features = loras[0].b.shape[0], loras[0].a.shape[1]
    total = sum(t.a.shape[0] for t in loras)
    full_rank = min(out_features, in_features)
    if combine.method in EXACT_METHODS and all(t.dare is None for t in loras):
        rank = min(combine.rank or total, total)
    elif combine.method == "svd" and all(t.dare is None for t in loras):
        rank = min(combine.rank or total, total, full_rank)
    else:
        assert combine.rank is not None
        rank = min(combine.rank, full_rank)
    if combine.rank is not None and combine.rank > full_rank:
        raise BadInput(
            f"merge.rank {combine.rank} is larger than module {module} allows ({out_features}×{in_features})",
            loc=("merge", "rank"),
            fix=f"use at most {full_rank}",
        )
    return ModuleTask(
        module=module,
        kind="embedding" if embedding else "linear",
        out_features=out_features,
        in_features=in_features,
        rank=rank,
        terms=loras,
        combine=combine,
        dtype=dtype,
    )


def _adapter_config(recipe: Recipe, base: Checkpoint, sources: dict[str, Adapter], tasks) -> dict:
    """PEFT adapter_config.json with scale 1 everywhere (lora_alpha = r, per module through the patterns)."""
    modules = [t for t in tasks if isinstance(t, ModuleTask)]
    ranks = Counter(t.rank for t in modules)
    r = ranks.most_common(1)[0][0] if ranks else 8
    rank_pattern = {_exact(t.module): t.rank for t in modules if t.rank != r}
    targets = _target_modules(base, [t.module for t in modules])
    first = next(iter(sources.values()))
    base_names = {a.config.get("base_model_name_or_path") for a in sources.values()}
    saved = sorted({t.name.removesuffix(".weight") for t in tasks if isinstance(t, TensorTask)})
    return {
        "peft_type": "LORA",
        "task_type": first.config.get("task_type") or "CAUSAL_LM",
        "base_model_name_or_path": base_names.pop() if len(base_names) == 1 else str(base.path),
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": dict(rank_pattern),
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "fan_in_fan_out": bool(first.config.get("fan_in_fan_out", False)),
        "target_modules": targets,
        "modules_to_save": saved or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _exact(module: str) -> str:
    """A rank_pattern key that PEFT's `(.*\\.)?(key)$` lookup matches for this module only."""
    return module.replace(".", r"\.")


def _target_modules(base: Checkpoint, modules: list[str]) -> list[str]:
    """Short names (q_proj) when they cover every such module of the base, else the full module names."""
    chosen: set[str] = set()
    by_suffix: dict[str, list[str]] = {}
    for module in modules:
        by_suffix.setdefault(module.rsplit(".", 1)[-1], []).append(module)
    for suffix, found in by_suffix.items():
        in_base = {
            n.removesuffix(".weight")
            for n in base.tensors
            if n.endswith(f".{suffix}.weight") or n == f"{suffix}.weight"
        }
        if set(found) == in_base:
            chosen.add(suffix)
        else:
            chosen.update(found)
    return sorted(chosen)
