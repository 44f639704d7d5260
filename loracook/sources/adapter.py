"""Source kind `adapter`: a PEFT adapter folder or hub id (`sources.X: path` or `{adapter: path, dare: …}`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loracook.io.checkpoint import Checkpoint
from loracook.io.peft import open_adapter
from loracook.io.resolve import resolve_path
from loracook.sources import OnTask, Source, dare_of


class AdapterKind:
    name = "adapter"

    def accepts(self, spec: Any) -> bool:
        return isinstance(spec, str) or hasattr(spec, "adapter")

    def open(self, name: str, spec: Any, base: Checkpoint, seed: int) -> Source:
        folder = resolve_path(spec if isinstance(spec, str) else spec.adapter, kind="adapter")
        adapter = open_adapter(folder)
        return Source(name, self, spec, adapter, dare_of(spec, seed), inputs=(Path(folder),))

    def make_real(self, source: Source, work: Path, seed: int, on_task: OnTask | None) -> Source:
        return source  # already real


ADAPTER = AdapterKind()
