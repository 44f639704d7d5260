"""A llama.cpp LoRA adapter as GGUF (what convert_lora_to_gguf.py writes): ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, and per module ``<base tensor>.lora_a`` (ne = [in, r]) and
``<base tensor>.lora_b`` (ne = [r, out]); the streaming writer and the executor's sink."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loracook.errors import BadInput
from loracook.io.gguf_file import (
    GGUFTensor,
    _block,
    _gguf,
    _StreamingFile,
    _StreamingWriter,
    _to_numpy,
    _types,
    gguf_arch,
    head_groups,
    permute_qk,
)


def check_adapter_export(tensor_names: Iterable[str], base_config: Mapping[str, Any], file_type: str) -> None:
    """Everything GGUFAdapterSink would refuse, at validate/plan time: the type, the base's architecture, and
    tensors that are not LoRA factors (modules_to_save copies, DoRA magnitudes, LoRA biases)."""
    _types(file_type)
    gguf_arch(base_config)
    for name in tensor_names:
        if _peft_factor(name) is None:
            raise BadInput(
                f"a llama.cpp LoRA GGUF holds only LoRA factors; {name} is not one",
                loc=("output", "format"),
                fix="write this adapter as safetensors, or merge it into a model output (output.kind: model)",
            )


def lora_alpha_and_gains(
    ranks: Mapping[str, int], scales: Mapping[str, float]
) -> tuple[float, dict[str, float]]:
    """``adapter.lora.alpha`` and the factor folded into each module's B so that llama.cpp's scale is PEFT's.

    llama.cpp scales every module by ``alpha / r_module`` from one alpha (``alpha = 0`` means 1). When one
    alpha fits every module (s·r equal everywhere, as in a plain PEFT adapter) it is written and B is left
    alone; otherwise alpha is 0 and each B carries its module's scale, which is exact for loracook's own
    adapters (scale 1 in every module)."""
    products = {module: scales[module] * ranks[module] for module in ranks}
    values = set(products.values())
    if len(values) == 1:
        return float(values.pop()), {module: 1.0 for module in ranks}
    return 0.0, {module: float(scales[module]) for module in ranks}


class GGUFLoraWriter(_StreamingWriter):
    """Stream a LoRA adapter into a llama.cpp adapter GGUF (what convert_lora_to_gguf.py writes).

    ``modules`` maps each HF module name (``model.layers.0.self_attn.q_proj``) to (rank, out_features,
    in_features) in the order :meth:`write` receives them; ``scales`` is PEFT's effective scale per module.
    Embedding LoRAs go in with ``embedding=True`` modules (``model.embed_tokens``): A is stored transposed.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        base_config: Mapping[str, Any],
        modules: Mapping[str, tuple[int, int, int]],
        scales: Mapping[str, float],
        embeddings: Iterable[str] = (),
        file_type: str = "f32",
        name: str | None = None,
    ) -> None:
        gguf = _gguf()
        arch, permute = gguf_arch(base_config)
        self.config = dict(base_config)
        self.permute = permute
        self.embeddings = set(embeddings)
        names = gguf.get_tensor_name_map(arch, int(base_config["num_hidden_layers"]))
        ranks = {m: r for m, (r, _, _) in modules.items()}
        self.alpha, self.gains = lora_alpha_and_gains(ranks, scales)
        qtype, ftype = _types(file_type)
        self.specs: list[GGUFTensor] = []
        for module, (rank, out_features, in_features) in modules.items():
            base = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
            if base is None:
                raise BadInput(f"GGUF LoRA export: no GGUF tensor for module {module!r}")
            if module in self.embeddings:  # PEFT: A (r, vocab), B (hidden, r); llama.cpp: A^T (vocab, r)
                a_shape, b_shape, a_transform = (in_features, rank), (out_features, rank), "transpose"
            else:
                a_shape, b_shape, a_transform = (rank, in_features), (out_features, rank), ""
            b_transform = ""
            if permute and module.endswith(".q_proj"):
                b_transform = "permute_q"
            elif permute and module.endswith(".k_proj"):
                b_transform = "permute_k"
            a_q = qtype if a_shape[-1] % _block(qtype) == 0 else gguf.GGMLQuantizationType.F32
            b_q = qtype if b_shape[-1] % _block(qtype) == 0 else gguf.GGMLQuantizationType.F32
            self.specs.append(GGUFTensor(f"{module}.lora_a", f"{base}.lora_a", a_shape, a_q, a_transform))
            self.specs.append(GGUFTensor(f"{module}.lora_b", f"{base}.lora_b", b_shape, b_q, b_transform))
        self._by_source = {spec.source: spec for spec in self.specs}

        def fill(writer: Any) -> None:
            writer.add_type(gguf.GGUFType.ADAPTER)
            writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
            writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, self.alpha)
            writer.add_file_type(int(ftype))
            if name:
                writer.add_name(name)

        self._file = _StreamingFile(path, gguf.MODEL_ARCH_NAMES[arch], self.specs, fill)

    def write(self, module: str, lora_A: Any, lora_B: Any) -> None:
        """Append one module's PEFT factors: ``lora_A`` (r, in) and ``lora_B`` (out, r), as saved by PEFT."""
        for suffix, tensor in ((".lora_a", lora_A), (".lora_b", lora_B)):
            spec = self._by_source[module + suffix]
            self._check_next(spec.source, "LoRA modules", module)
            data = _to_numpy(tensor).astype(np.float32, copy=False)
            if suffix == ".lora_b":
                gain = self.gains[module]
                if gain != 1.0:
                    data = data * np.float32(gain)
                if spec.transform:
                    data = permute_qk(data, head_groups(self.config, spec.transform))
            elif spec.transform == "transpose":
                data = np.ascontiguousarray(data.T)
            self._file.append(spec, data)


_PEFT_FACTORS = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}


def _peft_factor(name: str) -> tuple[str, str, bool] | None:
    """``base_model.model.X.lora_A.weight`` -> (X, "A", embedding?); None for anything that is not a factor."""
    for suffix, (which, embedding) in _PEFT_FACTORS.items():
        if name.endswith(suffix):
            return name.removeprefix("base_model.model.").removesuffix(suffix), which, embedding
    return None


class GGUFAdapterSink:
    """A PEFT adapter output as a llama.cpp LoRA GGUF, behind the executor's sink protocol.

    It takes the tensors the PEFT writer would get (``base_model.model.<module>.lora_A.weight`` …, whole or in
    row blocks) and the adapter_config dict, and writes each module as soon as both its factors are complete,
    in the order the plan declared them. Anything llama.cpp cannot apply as a LoRA (modules_to_save copies,
    DoRA magnitudes, LoRA biases) is a BadInput at ``start``, before any work."""

    in_flight = 0

    def __init__(
        self,
        path: str | Path,
        *,
        adapter_config: Mapping[str, Any],
        base_config: Mapping[str, Any],
        file_type: str = "f32",
        name: str | None = None,
    ) -> None:
        self.path, self.adapter_config, self.base_config = Path(path), dict(adapter_config), dict(base_config)
        self.file_type, self.name = file_type, name
        self.writer: GGUFLoraWriter | None = None

    def start(self, specs: Sequence[Any]) -> None:
        from loracook.serving import module_scale

        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        embeddings: set[str] = set()
        check_adapter_export([spec.name for spec in specs], self.base_config, self.file_type)
        for spec in specs:
            module, which, embedding = _peft_factor(spec.name)  # type: ignore[misc]
            shapes.setdefault(module, {})[which] = tuple(spec.shape)
            if embedding:
                embeddings.add(module)
        modules: dict[str, tuple[int, int, int]] = {}
        for module, pair in shapes.items():
            if set(pair) != {"A", "B"}:
                raise ValueError(f"{module}: lora_A and lora_B must both be in the plan")
            (rank, in_features), (out_features, _) = pair["A"], pair["B"]
            modules[module] = (rank, out_features, in_features)
        scales = {m: module_scale(self.adapter_config, m, r) for m, (r, _, _) in modules.items()}
        self.writer = GGUFLoraWriter(
            self.path,
            base_config=self.base_config,
            modules=modules,
            scales=scales,
            embeddings=embeddings,
            file_type=self.file_type,
            name=self.name,
        )
        self._order, self._next = list(modules), 0
        self._rows = {m: (modules[m][0], modules[m][1]) for m in modules}  # rows of A, rows of B
        self._parts: dict[tuple[str, str], list[np.ndarray]] = {}

    def write(self, name: str, block: Any) -> None:
        assert self.writer is not None, "start() first"
        module, which, _ = _peft_factor(name)  # type: ignore[misc]
        self._parts.setdefault((module, which), []).append(np.array(_to_numpy(block), dtype=np.float32))
        self._flush()

    def _complete(self, module: str, which: str) -> np.ndarray | None:
        parts = self._parts.get((module, which))
        want = self._rows[module][0 if which == "A" else 1]
        if not parts or sum(p.shape[0] for p in parts) < want:
            return None
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _flush(self) -> None:
        """Write every module, in the declared order, whose two factors have arrived."""
        while self._next < len(self._order):
            module = self._order[self._next]
            a, b = self._complete(module, "A"), self._complete(module, "B")
            if a is None or b is None:
                return
            self.writer.write(module, a, b)  # type: ignore[union-attr]
            del self._parts[(module, "A")], self._parts[(module, "B")]
            self._next += 1

    def finish(self) -> None:
        assert self.writer is not None, "start() first"
        self._flush()
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
