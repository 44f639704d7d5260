"""Source kinds: what a recipe's `sources.NAME` can be, as small strategy objects.

A kind opens its source for planning (headers only: a PEFT adapter, or for an extraction the adapter it will
produce at most) and makes it real at run time (an extraction runs and writes a PEFT adapter). Outside this
package no code tests which kind a source is; the planner and the executor see :class:`Source` values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from loracook.errors import BadInput
from loracook.io.checkpoint import Checkpoint
from loracook.io.peft import Adapter
from loracook.plan.tasks import Dare

OnTask = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Source:
    """One opened source: its adapter headers, its per-source DARE, the folders it reads, and its state."""

    name: str
    kind: SourceKind
    spec: Any  # the recipe's value for this source
    adapter: Adapter  # virtual (headers of what it will be) until the source is made real
    dare: Dare | None = None
    inputs: tuple[Path, ...] = ()  # folders this source reads: never written or deleted
    note: str | None = None  # a line for `plan` (e.g. the extraction's estimate)
    state: Any = None  # kind-specific (the extraction job)
    report: Any = None  # kind-specific, after run (the extraction report)

    @property
    def ready(self) -> bool:
        return not self.adapter.virtual


class SourceKind(Protocol):
    name: str

    def accepts(self, spec: Any) -> bool: ...

    def open(self, name: str, spec: Any, base: Checkpoint, seed: int) -> Source: ...

    def make_real(self, source: Source, work: Path, seed: int, on_task: OnTask | None) -> Source: ...


def _kinds() -> list[SourceKind]:
    from loracook.sources.adapter import ADAPTER
    from loracook.sources.extract import EXTRACT

    return [EXTRACT, ADAPTER]


def kind_of(spec: Any) -> SourceKind:
    return next(k for k in _kinds() if k.accepts(spec))


def open_sources(specs: dict[str, Any], base: Checkpoint, seed: int) -> dict[str, Source]:
    """Open every source's headers (nothing is extracted yet)."""
    opened: dict[str, Source] = {}
    for name, spec in specs.items():
        try:
            opened[name] = kind_of(spec).open(name, spec, base, seed)
        except BadInput as error:
            error.loc = error.loc or ("sources", name)
            raise
    return opened


def make_real(
    sources: dict[str, Source], work: Path, seed: int, on_task: OnTask | None = None
) -> dict[str, Source]:
    """Run what must run before the merge (extractions), each into its own folder under ``work``."""
    return {
        name: source if source.ready else source.kind.make_real(source, work / name, seed, on_task)
        for name, source in sources.items()
    }


def dare_of(spec: Any, seed: int) -> Dare | None:
    """A source's per-source DARE pre-processing, its seed defaulting to merge.seed."""
    dare = getattr(spec, "dare", None)
    if dare is None:
        return None
    return Dare(drop=dare.drop, rescale=dare.rescale, seed=dare.seed if dare.seed is not None else seed)


__all__ = ["Source", "SourceKind", "dare_of", "kind_of", "make_real", "open_sources", "replace"]
