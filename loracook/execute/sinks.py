"""Where executed tensors go. One plan, several sinks (mergekit's plan_to_disk / plan_in_memory):

- :class:`ShardSink`: the sharded safetensors writer, row blocks appended in plan order (model outputs);
- :class:`AdapterSink`: the PEFT adapter writer (tensors kept until the end; adapters are small);
- :class:`MemorySink`: a dict of whole tensors (a search's candidate, a test, evaluation from memory);
- :class:`Tee`: several sinks at once (write the model and keep it in memory to evaluate it);
- :class:`Finite`: the one finiteness check on every tensor the executor hands to any sink, whichever path
  computed it (streamed, whole, factored, passed through).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from loracook.errors import BadInput
from loracook.io.writer import OutputFolder, TensorSpec


class Sink(Protocol):
    in_flight: int  # blocks the sink may still hold after write() returns (their buffers are not reused)

    def start(self, specs: list[TensorSpec]) -> None: ...

    def write(self, name: str, block: torch.Tensor) -> None:
        """Rows of tensor ``name``, in plan order; a whole tensor is one block."""

    def finish(self) -> None: ...


class ShardSink:
    """Safetensors shards whose headers are written up front, through the output folder's writer thread."""

    in_flight = OutputFolder.QUEUE

    def __init__(self, out: OutputFolder, shard_size: int) -> None:
        self.out, self.shard_size = out, shard_size

    def start(self, specs: list[TensorSpec]) -> None:
        self.out.start_tensors(specs, self.shard_size)

    def write(self, name: str, block: torch.Tensor) -> None:
        self.out.write(name, block)

    def finish(self) -> None:
        self.out.finish_tensors()


class AdapterSink:
    """A PEFT adapter: adapter_model.safetensors and adapter_config.json (written through io/peft)."""

    in_flight = 0

    def __init__(self, folder: Path, config: dict) -> None:
        self.folder, self.config = folder, config
        self.tensors: dict[str, torch.Tensor] = {}

    def start(self, specs: list[TensorSpec]) -> None:
        self.tensors = {}

    def write(self, name: str, block: torch.Tensor) -> None:
        self.tensors[name] = block

    def finish(self) -> None:
        from loracook.io.peft import save_adapter

        save_adapter(self.folder, self.tensors, self.config)


class MemorySink:
    """Whole tensors in a dict; row blocks are copied (the executor reuses their buffers) and joined."""

    in_flight = 0

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._parts: dict[str, list[torch.Tensor]] = {}

    def start(self, specs: list[TensorSpec]) -> None:
        self.tensors, self._parts = {}, {}

    def write(self, name: str, block: torch.Tensor) -> None:
        self._parts.setdefault(name, []).append(block.clone())

    def finish(self) -> None:
        for name, parts in self._parts.items():
            self.tensors[name] = torch.cat(parts) if len(parts) > 1 else parts[0]
        self._parts = {}


class Tee:
    """Every block to each sink."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = sinks
        self.in_flight = max(s.in_flight for s in sinks)

    def start(self, specs: list[TensorSpec]) -> None:
        for sink in self.sinks:
            sink.start(specs)

    def write(self, name: str, block: torch.Tensor) -> None:
        for sink in self.sinks:
            sink.write(name, block)

    def finish(self) -> None:
        for sink in self.sinks:
            sink.finish()


class Finite:
    """Refuses a block with NaN or infinity before it reaches ``sink``: nothing broken is ever written."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.in_flight = sink.in_flight

    def start(self, specs: list[TensorSpec]) -> None:
        self.sink.start(specs)

    def write(self, name: str, block: torch.Tensor) -> None:
        require_finite(name, block)
        self.sink.write(name, block)

    def finish(self) -> None:
        self.sink.finish()


def require_finite(name: str, tensor: torch.Tensor) -> None:
    """BadInput when ``tensor`` holds NaN or infinity. One reduction (a sum is NaN or infinite when any entry
    is); the element-wise test runs only when the sum is not finite, which a huge but finite tensor can be."""
    if not tensor.dtype.is_floating_point or not tensor.numel() or bool(torch.isfinite(tensor.sum())):
        return
    if not bool(torch.isfinite(tensor).all()):
        raise BadInput(
            f"output tensor {name} holds NaN or infinite values",
            fix="check the merge weights (an overflow) and the sources (their tensors, and lora_alpha in "
            "adapter_config.json)",
        )
