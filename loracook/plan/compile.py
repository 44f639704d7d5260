"""Compile a plan: check the sources against the base's headers and build the task list (no tensor data).

The output kind builds its tasks from the terms collected here (loracook/outputs); the merge method's traits
decide ranks (loracook/methods). Weights are not read here: they are bound when the plan is executed.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from loracook.errors import BadInput
from loracook.io.checkpoint import Checkpoint, open_checkpoint
from loracook.io.names import is_embedding, is_token_embedding, stores_transposed
from loracook.io.peft import Adapter, LoraModule
from loracook.io.resolve import open_gguf_base, resolve_path
from loracook.methods import method_of
from loracook.plan.tasks import BiasTerm, Combine, FullTerm, LoraTerm, Plan, Term
from loracook.plan.values import Values
from loracook.sources import Source


def load_base(spec, *, dequantize: bool = True) -> Checkpoint:
    """Open the base model's headers. A GGUF base is dequantized into the cache once when its tensors will be
    read (``dequantize``); otherwise its header alone gives names, shapes and the config."""
    try:
        folder = resolve_path(spec.path, revision=spec.revision, kind="base model")
        if spec.gguf_file:
            return open_gguf_base(folder, spec.gguf_file, dequantize=dequantize)
        return open_checkpoint(folder)
    except BadInput as error:
        error.loc = error.loc or ("base",)
        raise


def compile_plan(recipe, base: Checkpoint, sources: dict[str, Source]) -> Plan:
    """Check the recipe against the files' headers and build the task list.

    >>> plan = compile_plan(recipe, base, sources)  # doctest: +SKIP
    >>> len(plan.tasks), plan.bytes_written  # doctest: +SKIP
    """
    from loracook.outputs import output_kind

    method = method_of(recipe.merge)
    combine = Combine(method, recipe.merge, seed=recipe.merge.seed)
    kind = output_kind(recipe.output.kind)
    kind.check_method(recipe, combine, sources)
    values = recipe_values(recipe, base)
    values.check()
    adapters = {name: s.adapter for name, s in sources.items()}
    terms = collect_terms(base, sources, values)
    _check_method_fits(combine, terms)
    plan = kind.plan(recipe, base, adapters, terms, combine)
    notes = tuple(s.note for s in sources.values() if s.note and not s.ready)
    return replace(plan, notes=plan.notes + notes)  # replace keeps an output kind's Plan subclass


def _check_method_fits(combine: Combine, terms: dict[str, list[Term]]) -> None:
    """Methods that work on LoRA factors only refuse what has none; a method's own per-module checks."""
    method = combine.method
    for target, found in terms.items():
        if not method.dense_form:
            odd = next((t for t in found if not isinstance(t, LoraTerm) or t.magnitude or t.dare), None)
            if odd is not None:
                what = (
                    "DARE pre-processing"
                    if getattr(odd, "dare", None)
                    else "DoRA"
                    if getattr(odd, "magnitude", None)
                    else "a tensor saved in full (modules_to_save) or a LoRA bias"
                )
                raise BadInput(
                    f"method {method.name} works on plain LoRA factors, but source {odd.source!r} brings {what} "
                    f"for {target}",
                    loc=("merge", "method"),
                    fix="use a method that merges dense deltas (e.g. ties), or drop that part of the source",
                )
        problem = method.check_terms(combine.params, [t for t in found if isinstance(t, LoraTerm)])
        if problem:
            raise BadInput(problem, loc=("merge",))


def recipe_values(recipe, base: Checkpoint) -> Values:
    """The recipe's own weights and densities, bound to this base's layer count."""
    density = getattr(recipe.merge, "density", 1.0)
    densities = {n: float(density[n] if isinstance(density, dict) else density) for n in recipe.sources}
    return Values(dict(recipe.merge.weights), densities, base.num_layers)


# ------------------------------------------------------------------------------------------------ terms


def embedding_name(base: Checkpoint) -> str | None:
    return next((name for name in base.tensors if is_token_embedding(name)), None)


def _target(base: Checkpoint, name: str) -> str | None:
    """The base tensor an adapter tensor applies to; lm_head goes to the embedding when they are tied."""
    if name in base.tensors:
        return name
    if name == "lm_head.weight" and base.tied_embeddings:
        return embedding_name(base)
    return None


def collect_terms(base: Checkpoint, sources: dict[str, Source], values: Values) -> dict[str, list[Term]]:
    """Every source's terms, keyed by the base tensor they change; all mismatches are reported at once.
    ``values`` only checks that every weight resolves (filter rules that match nothing)."""
    terms: dict[str, list[Term]] = {}
    problems: list[tuple[str, str]] = []

    def check_weight(source: str, at: str) -> None:
        try:
            values.weight(source, at)
        except BadInput as error:
            problems.append((source, error.message))

    conv1d = stores_transposed(base.config)
    for name, source in sources.items():
        adapter, dare = source.adapter, source.dare
        for module in adapter.modules.values():
            if conv1d and module.kind == "linear" and not module.fan_in_fan_out:
                # PEFT corrects the flag for Conv1D layers (with a warning): the factors are for (in, out)
                module = replace(module, fan_in_fan_out=True)
            problem = _check_module(base, module)
            if problem:
                problems.append((name, problem))
                continue
            target = _target(base, module.weight_name)
            assert target is not None
            check_weight(name, target)
            transposed = module.kind == "embedding" or module.fan_in_fan_out
            terms.setdefault(target, []).append(
                LoraTerm(name, target, module.a, module.b, module.scale, transposed, module.magnitude, dare)
            )
            if module.bias is not None:
                terms.setdefault(f"{module.module}.bias", []).append(
                    BiasTerm(name, target, module.bias, module.scale, dare)
                )
        for tensor, info in adapter.full.items():
            target = _target(base, tensor)
            if target is None:
                problems.append((name, f"{tensor} (saved in full) is not in the base"))
            elif base.tensors[target].shape != info.shape:
                what = (
                    "vocabulary sizes differ"
                    if is_embedding(target) or "lm_head" in tensor
                    else "shapes differ"
                )
                problems.append(
                    (
                        name,
                        f"{tensor}: {what}, adapter {list(info.shape)} vs base {list(base.tensors[target].shape)}",
                    )
                )
            else:
                check_weight(name, target)
                terms.setdefault(target, []).append(FullTerm(name, target, info, dare))
    if problems:
        _refuse(problems, {n: s.adapter for n, s in sources.items()})
    return terms


def _refuse(problems: list[tuple[str, str]], adapters: dict[str, Adapter]) -> None:
    source = problems[0][0]
    mine = [p for s, p in problems if s == source]
    shown = "; ".join(mine[:8]) + (f"; and {len(mine) - 8} more" if len(mine) > 8 else "")
    raise BadInput(
        f"adapter {source!r} does not fit the base model ({len(mine)} problem{'s' if len(mine) > 1 else ''}): "
        + shown,
        file=adapters[source].file,
        loc=("sources", source),
        fix="was it trained on this base? check `base:`",
    )


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


def output_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def in_file_order(base: Checkpoint, names) -> list[str]:
    """Tensor names in the order they sit in the base's files (reads are then sequential)."""
    return sorted(names, key=lambda n: (base.tensors[n].file, base.tensors[n].offset or 0, n))


__all__ = ["Path", "collect_terms", "compile_plan", "in_file_order", "load_base", "output_dtype"]
