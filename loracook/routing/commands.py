"""What `loracook generate` and `loracook route` do, without the terminal (the CLI prints the results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loracook.errors import BadInput
from loracook.routing.artifact import is_router
from loracook.routing.prompts import read_prompts


def generate(
    path: Path,
    prompts: list[str] | None,
    *,
    file: Path | None = None,
    explain: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    base: Path | None = None,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Greedy completions from a router (each prompt routed on its own), a model or an adapter folder."""
    from loracook.evaluation.candidates import path_candidate
    from loracook.routing.generate import generate_texts

    _check_counts(max_new_tokens=max_new_tokens, batch_size=batch_size)
    _check_folder(path, "a router, model or adapter folder")
    router = is_router(path)
    if explain and not router:
        raise BadInput("--explain shows a router's weights, but this is not a router folder", file=path)
    if prompts is None:
        assert file is not None
        prompts = read_prompts(file)
    with path_candidate(path, base=base, device=device).open() as (model, tokenizer):
        rows = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    if not explain:
        rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return rows


def route(
    path: Path, file: Path, *, batch_size: int = 16, base: Path | None = None, device: str = "cpu"
) -> list[str]:
    """One JSON line per prompt: the weight of each source, the top-1 source and its adapter folder."""
    from loracook.routing.evaluation import router_candidate

    _check_counts(batch_size=batch_size)
    _check_folder(path, "a router folder")
    if not is_router(path):
        raise BadInput(
            "not a router folder (no router.json)",
            file=path,
            fix="`loracook route` needs a folder written by a recipe with output.kind router",
        )
    prompts = read_prompts(file)
    with router_candidate(path, base=base, device=device).open() as (model, _):
        router = model.router
        explained = router.explain(router.weights(prompts, batch_size=batch_size))
    lines = []
    for prompt, info in zip(prompts, explained, strict=True):
        row = {"prompt": prompt, **info, "adapter": str(router.adapter_dir(info["top"]))}
        lines.append(json.dumps(row, ensure_ascii=False))
    return lines


def _check_folder(path: Path, what: str) -> None:
    if not Path(path).exists():
        raise BadInput("no such folder", file=path, fix=f"give {what}")
    if not Path(path).is_dir():
        raise BadInput("not a folder", file=path, fix=f"give {what}")


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        if value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, got {value}")
