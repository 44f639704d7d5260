"""Can vLLM or LoRAX serve this adapter? Pure rules, checked before any work (`output.serve`) and reported
in the model card and `loracook inspect`.

Both engines load a plain PEFT folder, but each reads only part of what PEFT can save, and they fail in two
ways: vLLM refuses the adapter at load time (modules_to_save, DoRA, a bias, an unknown target, a rank above
``--max-lora-rank``); LoRAX loads it and logs "unused adapter weights", silently serving a different model.
Both compute one scale, ``lora_alpha / r`` from the top of adapter_config.json, for every module, so
``rank_pattern``/``alpha_pattern`` that change the scale are served wrongly by both. docs/serving.md lists
each rule with the source line it comes from.

The rules look at an :class:`AdapterFacts`, which the planner can build from a plan (before anything is
written) and :func:`facts_from_folder` builds from an adapter on disk (config + safetensors header, no torch).
Each broken rule is a :class:`Problem` with a fix that names what to change in the recipe.

The facts are in ``serving/facts.py``, the rules of each engine in ``serving/rules.py``; this module checks them
(``output.serve``) and summarises them for the model card and `loracook inspect`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from loracook.serving.facts import AdapterFacts, adapter_facts, facts_from_folder, module_scale
from loracook.serving.rules import (
    ENGINES,
    LORAX_TARGETS,
    VLLM_DEFAULT_MAX_LORA_RANK,
    VLLM_MAX_LORA_RANKS,
    VLLM_TARGETS,
    Problem,
    lorax_problems,
    vllm_max_lora_rank,
    vllm_problems,
)

__all__ = [
    "ENGINES",
    "LORAX_TARGETS",
    "VLLM_DEFAULT_MAX_LORA_RANK",
    "VLLM_MAX_LORA_RANKS",
    "VLLM_TARGETS",
    "AdapterFacts",
    "Problem",
    "adapter_facts",
    "check",
    "facts_from_folder",
    "lorax_problems",
    "module_scale",
    "serving_summary",
    "summary_lines",
    "vllm_max_lora_rank",
    "vllm_problems",
]


def check(
    facts: AdapterFacts, engines: str | Sequence[str], *, max_lora_rank: int | None = None
) -> list[Problem]:
    """The problems for each engine named (``output.serve``), blocking ones first."""
    names = [engines] if isinstance(engines, str) else list(engines)
    out: list[Problem] = []
    for name in names:
        if name == "vllm":
            out += vllm_problems(facts, max_lora_rank=max_lora_rank)
        elif name == "lorax":
            out += lorax_problems(facts)
        else:
            raise ValueError(f"unknown serving engine {name!r}; expected one of {', '.join(ENGINES)}")
    return sorted(out, key=lambda p: not p.blocking)


def serving_summary(facts: AdapterFacts) -> dict[str, Any]:
    """For the model card and `loracook inspect`: per engine, whether it serves the adapter and why not.

    ``{"max_rank": 24, "vllm": {"servable": True, "max_lora_rank": 32, "problems": [...]}, "lorax": {...}}``
    """
    vllm = vllm_problems(facts)
    lorax = lorax_problems(facts)
    return {
        "max_rank": facts.max_rank,
        "vllm": {
            "servable": not any(p.blocking for p in vllm),
            "max_lora_rank": vllm_max_lora_rank(facts.max_rank),
            "problems": [p.one_line() for p in vllm],
        },
        "lorax": {
            "servable": not any(p.blocking for p in lorax),
            "problems": [p.one_line() for p in lorax],
        },
    }


def summary_lines(summary: Mapping[str, Any]) -> list[str]:
    """Markdown bullet lines for a model card's "Serving" section."""
    vllm, lorax = summary["vllm"], summary["lorax"]
    lines = []
    if vllm["servable"]:
        lines.append(
            f"- vLLM: yes, with `--enable-lora --max-lora-rank {vllm['max_lora_rank']}`"
            f" (largest module rank {summary['max_rank']})"
        )
    else:
        lines.append("- vLLM: no")
    lines += [f"  - {p}" for p in vllm["problems"]]
    lines.append("- LoRAX: yes" if lorax["servable"] else "- LoRAX: no")
    lines += [f"  - {p}" for p in lorax["problems"]]
    return lines
