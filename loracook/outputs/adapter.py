"""Output kind `adapter`: one PEFT LoRA adapter, each module's merged factors at scale 1 (lora_alpha = r),
written through io/peft; tensors the sources save in full become modules_to_save."""

from __future__ import annotations

from pathlib import Path

import torch

from loracook.errors import BadInput, Unsupported
from loracook.execute.sinks import AdapterSink
from loracook.io.peft import adapter_config, saved_name
from loracook.io.writer import OutputFolder
from loracook.outputs import gguf_type
from loracook.plan.compile import in_file_order, output_dtype
from loracook.plan.tasks import BiasTerm, Combine, FullTerm, LoraTerm, ModuleTask, Plan, TensorTask


class AdapterKind:
    name = "adapter"

    def check_method(self, recipe, combine: Combine, sources) -> None:
        dared = [n for n, s in sources.items() if s.dare is not None]
        needs = not combine.method.factored_form or dared
        if combine.rank is None and needs:
            what = (
                f"method {combine.name}"
                if not combine.method.factored_form
                else f"DARE on source {dared[0]!r}"
            )
            raise BadInput(
                f"{what} makes dense deltas; an adapter output needs merge.rank to recompress them",
                loc=("merge",),
                fix="add merge.rank (e.g. 64)",
            )

    def plan(self, recipe, base, adapters, terms, combine: Combine) -> Plan:
        for name, adapter in adapters.items():
            if adapter.uses_dora:
                raise Unsupported(
                    f"source {name!r} is a DoRA adapter: its change depends on the base weights and is not a LoRA",
                    loc=("sources", name),
                    fix="merge it into a model (output.kind: model) instead",
                )
        fifo = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters.values() if a.modules}
        if len(fifo) > 1:
            raise BadInput(
                "the sources disagree on fan_in_fan_out: were they made for the same base?", loc=("sources",)
            )
        if any(isinstance(t, BiasTerm) for found in terms.values() for t in found):
            raise Unsupported(
                "lora_bias sources in an adapter output are not supported yet",
                loc=("sources",),
                fix="merge them into a model (output.kind: model)",
            )
        dtype = torch.float32 if recipe.output.dtype == "auto" else output_dtype(recipe.output.dtype)
        tasks: list[ModuleTask | TensorTask] = []
        for name in in_file_order(base, terms):
            found = terms[name]
            loras = tuple(t for t in found if isinstance(t, LoraTerm))
            if loras:
                tasks.append(_module_task(name.removesuffix(".weight"), loras, combine, dtype))
            # Copies of embedding layers that PEFT saves next to an embedding LoRA are the base's own weights.
            fulls = tuple(
                t
                for t in found
                if isinstance(t, FullTerm) and t.tensor.name not in adapters[t.source].base_layer_copies
            )
            if fulls:
                tasks.append(TensorTask(name, base.tensors[name], dtype, fulls, combine, saved_name(name)))
        plan = Plan(
            kind=self.name,
            tasks=tuple(tasks),
            base=base,
            combine=combine,
            sources=adapters,
            shard_size=recipe.output.shard_size,
            adapter_config=_config(base, adapters, tasks),
            parallel=True,
        )
        _check_export(plan, recipe.output)
        return plan

    def sink(self, plan: Plan, out: OutputFolder, spec):
        if spec.format == "gguf":  # a llama.cpp LoRA adapter GGUF
            from loracook.io.gguf_write import GGUFAdapterSink

            return GGUFAdapterSink(
                out.tmp / "adapter.gguf",
                adapter_config=plan.adapter_config,
                base_config=plan.base.config,
                file_type=gguf_type(spec, "f32"),
            )
        return AdapterSink(out.tmp, plan.adapter_config)

    def side_files(self, plan: Plan, out: OutputFolder, spec) -> None:
        pass  # the sink writes adapter_config.json beside the tensors (or the GGUF holds it)

    def card_facts(self, plan: Plan) -> tuple[str, list[str], list[str]]:
        from loracook.serving import serving_summary, summary_lines

        modules = [t for t in plan.tasks if isinstance(t, ModuleTask)]
        ranks = sorted({t.rank for t in modules})
        what = f"a PEFT LoRA adapter combining {len(plan.sources)} adapter(s) by `{plan.method}`"
        facts = [f"- modules: {len(modules)}, ranks {', '.join(map(str, ranks))}", "", "## Serving", ""]
        facts += summary_lines(serving_summary(serving_facts(plan)))
        return what, facts, ["library_name: peft", "base_model_relation: adapter"]

    def memory_sink(self, plan: Plan):
        return None  # the adapter is small: evaluation reads it from the folder

    def candidate(self, name: str, plan: Plan, folder: Path, memory, base):
        from loracook.evaluation import adapter_candidates

        return adapter_candidates(base, {name: folder})[0]


def serving_facts(plan: Plan):
    """What the serving rules (loracook/serving.py) need to know about the planned adapter."""
    from loracook.serving import adapter_facts

    modules = [t for t in plan.tasks if isinstance(t, ModuleTask)]
    architectures = plan.base.config.get("architectures") or [None]
    return adapter_facts(
        plan.adapter_config,
        {t.module: t.rank for t in modules},
        architecture=architectures[0],
        num_layers=plan.base.num_layers,
        embedding_modules=[t.module for t in modules if t.kind == "embedding"],
        saved_tensors=[t.out_name or t.name for t in plan.tasks if isinstance(t, TensorTask)],
        method=plan.method,
    )


def _check_export(plan: Plan, spec) -> None:
    """`output.format: gguf` and `output.serve`, checked before any tensor is read."""
    if spec.format == "gguf":
        from loracook.io.gguf_write import check_adapter_export

        names = [name for name, _, _ in plan.output_specs()]
        check_adapter_export(names, plan.base.config, gguf_type(spec, "f32"))
    if spec.serve:
        from loracook.serving import check

        for problem in check(serving_facts(plan), spec.serve, max_lora_rank=spec.max_lora_rank):
            if problem.blocking:
                raise BadInput(problem.message, loc=("output", "serve"), fix=problem.fix)


def _module_task(module: str, loras: tuple[LoraTerm, ...], combine: Combine, dtype) -> ModuleTask:
    embedding = any(".lora_embedding" in t.a.name for t in loras)
    out_features, in_features = loras[0].b.shape[0], loras[0].a.shape[1]
    total = sum(t.a.shape[0] for t in loras)
    full_rank = min(out_features, in_features)
    dared = any(t.dare is not None for t in loras)
    if combine.rank is not None and combine.rank > full_rank:
        raise BadInput(
            f"merge.rank {combine.rank} is larger than module {module} allows ({out_features}×{in_features})",
            loc=("merge", "rank"),
            fix=f"use at most {full_rank}",
        )
    rank = combine.method.output_rank(combine.params, total, full_rank, dared)
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


def _config(base, adapters, tasks) -> dict:
    """adapter_config.json: scale 1 everywhere (lora_alpha = r, per module through the patterns)."""
    modules = [t for t in tasks if isinstance(t, ModuleTask)]
    first = next(iter(adapters.values()))
    base_names = {a.config.get("base_model_name_or_path") for a in adapters.values()}
    saved = sorted({t.name.removesuffix(".weight") for t in tasks if isinstance(t, TensorTask)})
    return adapter_config(
        {t.module: t.rank for t in modules},
        target_modules=_target_modules(base, [t.module for t in modules]),
        modules_to_save=saved or None,
        base_model=base_names.pop() if len(base_names) == 1 else str(base.path),
        fan_in_fan_out=bool(first.config.get("fan_in_fan_out", False)),
        task_type=first.config.get("task_type") or "CAUSAL_LM",
    )


def _target_modules(base, modules: list[str]) -> list[str]:
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


ADAPTER = AdapterKind()
