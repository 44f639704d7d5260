"""Output kind `router`: a folder that routes each input to a mix of the sources instead of merging them.

The plan has no tensor tasks (nothing is merged); the kind checks at plan time what the router will need
(sources a mixture can weight, the exemplar files, the embedding layer) and its side files write the router
folder (loracook/routing/build.py: adapters/, router.safetensors, router.json) into the output's temporary
folder, so the router appears atomically like every output. docs/routing.md describes the methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loracook.errors import BadInput, Unsupported
from loracook.io.writer import OutputFolder
from loracook.plan.tasks import Combine, Plan


@dataclass(frozen=True)
class RouterPlan(Plan):
    """A plan without tasks, plus the recipe's `route:` section and its base spec."""

    route: Any = None
    base_spec: Any = None

    @property
    def bytes_written(self) -> int:  # the adapters copied into the router folder
        return sum(m.a.nbytes + m.b.nbytes for a in self.sources.values() for m in a.modules.values())


class _NoTensors:
    """The executor's sink for a plan without tasks."""

    in_flight = 0

    def start(self, specs) -> None:
        pass

    def write(self, name: str, block) -> None:  # pragma: no cover - a router plan has no tasks
        raise RuntimeError("a router plan writes no tensors")

    def finish(self) -> None:
        pass


class RouterKind:
    name = "router"

    def check_method(self, recipe, combine: Combine, sources) -> None:
        if "merge" in recipe.model_fields_set:
            raise BadInput(
                "output.kind router does not merge: the `merge:` section has no effect",
                loc=("merge",),
                fix="remove the merge section (route: says how the sources are mixed)",
            )
        for name, source in sources.items():
            if source.dare is not None:
                raise BadInput(
                    f"source {name!r} has DARE pre-processing, which makes a dense delta that a router cannot apply",
                    loc=("sources", name, "dare"),
                    fix="remove dare from the source",
                )

    def plan(self, recipe, base, adapters, terms, combine: Combine) -> Plan:
        from loracook.routing.prompts import read_prompts

        route = recipe.route
        assert route is not None  # the recipe checks guarantee it
        for name, adapter in adapters.items():
            _check_source(name, adapter, route.method)
        counts = {}
        if route.method in ("centroid", "gate"):
            for name in adapters:
                counts[name] = len(
                    read_prompts(route.exemplars[name], what=f"exemplar file of source {name!r}")
                )
        if route.layer is not None and not 0 <= route.layer <= base.num_layers:
            raise BadInput(
                f"route.layer {route.layer} is outside the base's layers (0 to {base.num_layers})",
                loc=("route", "layer"),
                fix=f"use 0 to {base.num_layers}, or leave it out for the middle layer",
            )
        layer = route.layer if route.layer is not None else max(1, base.num_layers // 2)
        how = (
            f"{sum(counts.values())} exemplars, embedding layer {layer} of {base.num_layers}"
            if counts
            else "prototypes from each module's factors"
        )
        note = (
            f"router: {route.method} over {len(adapters)} sources ({how}); top_k {route.top_k or 'all'}, "
            f"temperature {route.temperature:g}; nothing is merged"
        )
        return RouterPlan(
            kind=self.name,
            tasks=(),
            base=base,
            combine=combine,
            sources=adapters,
            notes=(note,),
            route=route,
            base_spec=recipe.base_spec,
        )

    def sink(self, plan: Plan, out: OutputFolder, spec: Any = None):
        return _NoTensors()

    def side_files(self, plan: Plan, out: OutputFolder, spec: Any = None) -> None:
        from loracook.routing.build import build_router

        assert isinstance(plan, RouterPlan)
        build_router(
            out.tmp,
            adapters={name: adapter.path for name, adapter in plan.sources.items()},
            route=plan.route,
            base_folder=plan.base.path,
            base_spec={"path": str(Path(plan.base.path).resolve()), "spec": plan.base_spec.model_dump()},
            num_layers=plan.base.num_layers,
        )

    def card_facts(self, plan: Plan) -> tuple[str, list[str], list[str]]:
        assert isinstance(plan, RouterPlan)
        route = plan.route
        what = (
            f"a router over {len(plan.sources)} LoRA adapters (`{route.method}` routing); nothing is merged"
        )
        facts = [
            f"- routing: {route.method}, top_k {route.top_k or 'all'}, temperature {route.temperature:g}"
            + ("" if route.method == "arrow" else f", prompts embedded at layer {route.layer or 'middle'}"),
            "- the sources as plain PEFT adapters: `adapters/<source>/`; the router: `router.json`, "
            "`router.safetensors`",
            '- use: `loracook generate THIS_FOLDER "prompt" --explain`, `loracook route THIS_FOLDER --file '
            "prompts.jsonl`, or `loracook.routing.load_router(THIS_FOLDER)` in Python (docs/routing.md)",
        ]
        base_name = plan.base.config.get("_name_or_path") or plan.base.path.name
        return what, facts, [f"base_model: {base_name}"]

    def memory_sink(self, plan: Plan):
        return None

    def candidate(self, name: str, plan: Plan, folder: Path, memory, base):
        from loracook.routing.evaluation import router_candidate

        return router_candidate(folder, base=base, name=name)


def _check_source(name: str, adapter, method: str) -> None:
    """What a LoRA mixture cannot weight, refused before any work (headers only)."""
    where = {"file": adapter.file if not adapter.virtual else None, "loc": ("sources", name)}
    if adapter.uses_dora:
        raise Unsupported(
            f"source {name!r} is a DoRA adapter, whose change is not a low-rank term a router can weight",
            fix="merge it into a model instead",
            **where,
        )
    if any(m.bias is not None for m in adapter.modules.values()):
        raise Unsupported(f"source {name!r} has lora_bias, which a router cannot weight", **where)
    saved = [t for t, info in adapter.full.items() if info.name not in adapter.base_layer_copies]
    if saved and not adapter.virtual:
        raise Unsupported(
            f"source {name!r} replaces {saved[0]} in full (modules_to_save), which a router cannot weight",
            fix="use an adapter without modules_to_save, or merge it into a model instead",
            **where,
        )
    if method == "arrow":
        embedded = [m for m, info in adapter.modules.items() if info.kind == "embedding"]
        if embedded:
            raise BadInput(
                f"route.method arrow routes the inputs of linear layers, but source {name!r} adapts the "
                f"embedding {embedded[0]}",
                loc=("route", "method"),
                fix="use method centroid or gate",
            )


ROUTER = RouterKind()
