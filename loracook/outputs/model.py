"""Output kind `model`: the base with the merge added, W' = W + combine(ΔW_i), as sharded safetensors plus
the base's config (its dtype entry updated) and tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from loracook.errors import BadInput
from loracook.execute.sinks import MemorySink, ShardSink
from loracook.io.writer import OutputFolder
from loracook.outputs import gguf_type
from loracook.plan.compile import in_file_order, output_dtype
from loracook.plan.tasks import Combine, Plan, TensorTask

IN_MEMORY_EVAL_BYTES = 4 * 10**9  # a merged model this small is evaluated from memory, not reloaded from disk


class ModelKind:
    name = "model"

    def check_method(self, recipe, combine: Combine, sources) -> None:
        if combine.method.exact and combine.rank is not None:
            raise BadInput(
                f"merge.rank has no effect for {combine.name} into a model (the sum is exact)",
                loc=("merge", "rank"),
                fix="remove it, or use method svd for a low-rank merge",
            )

    def plan(self, recipe, base, adapters, terms, combine: Combine) -> Plan:
        if recipe.output.serve:
            raise BadInput(
                "output.serve checks adapters for serving engines; a merged model needs no LoRA support",
                loc=("output", "serve"),
                fix="remove serve, or write an adapter (output.kind: adapter)",
            )
        if recipe.output.format == "gguf":
            from loracook.io.gguf_write import check_model_export

            check_model_export(base.config, _tokenizer_dir(base), gguf_type(recipe.output, "f16"))
        tasks = []
        for name in in_file_order(base, base.tensors):
            info = base.tensors[name]
            dtype = info.dtype
            if recipe.output.dtype != "auto" and info.dtype.is_floating_point:
                dtype = output_dtype(recipe.output.dtype)
            tasks.append(TensorTask(name, info, dtype, tuple(terms.get(name, ())), combine))
        return Plan(
            kind=self.name,
            tasks=tuple(tasks),
            base=base,
            combine=combine,
            sources=adapters,
            shard_size=recipe.output.shard_size,
        )

    def sink(self, plan: Plan, out: OutputFolder, spec):
        if spec.format == "gguf":  # one GGUF file for llama.cpp and Ollama, streamed like the shards
            from loracook.io.gguf_write import GGUFModelSink

            return GGUFModelSink(
                out.tmp / "model.gguf",
                config=plan.base.config,
                tokenizer_dir=_tokenizer_dir(plan.base),
                file_type=gguf_type(spec, "f16"),
            )
        return ShardSink(out, plan.shard_size)

    def side_files(self, plan: Plan, out: OutputFolder, spec) -> None:
        if spec.format == "gguf":
            return  # the GGUF file carries the config and the tokenizer
        for path in plan.copy_files:
            if path.name == "config.json":
                out.write_text("config.json", _config_with_dtype(path, plan))
            else:
                out.copy(path)

    def card_facts(self, plan: Plan) -> tuple[str, list[str], list[str]]:
        changed = sum(1 for t in plan.tasks if t.terms)
        what = f"the base model merged with {len(plan.sources)} LoRA adapter(s) by `{plan.method}`"
        return (
            what,
            [f"- tensors changed: {changed} of {len(plan.tasks)}"],
            ["library_name: transformers", "base_model_relation: merge"],
        )

    def memory_sink(self, plan: Plan):
        return MemorySink() if plan.bytes_written <= IN_MEMORY_EVAL_BYTES else None

    def candidate(self, name: str, plan: Plan, folder: Path, memory, base):
        from loracook.evaluation import folder_candidate, model_candidate

        if memory is not None:
            return model_candidate(name, memory.tensors, base=base)
        return folder_candidate(folder, name=name)


def _tokenizer_dir(base) -> Path | None:
    """The base's folder when it holds tokenizer files (a GGUF export embeds the tokenizer)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return base.path if base.path and any((Path(base.path) / n).is_file() for n in names) else None


def _config_with_dtype(path: Path, plan: Plan) -> str:
    """The base's config.json, with its dtype entry naming the dtype the weights were written in."""
    config = json.loads(path.read_text(encoding="utf-8"))
    dtypes = {t.dtype for t in plan.tasks if t.dtype.is_floating_point}
    if len(dtypes) == 1:
        name = str(dtypes.pop()).removeprefix("torch.")
        for key in ("dtype", "torch_dtype"):
            if key in config or key == "dtype":
                config[key] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


MODEL = ModelKind()
