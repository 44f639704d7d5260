"""A whole model as GGUF (f32, f16, bf16, q8_0): the tensor table through the ``gguf`` package's tensor-name
map, the ``{arch}.*`` hyper-parameters, the streaming writer and the executor's sink.

1-D tensors are f32 and the rest the chosen type; the rows of Llama's q_proj/k_proj are permuted the way
llama.cpp's rotary embedding wants them (transformers' GGUF loader undoes it), and a tied lm_head is left out
(both readers reuse token_embd).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loracook.errors import BadInput
from loracook.io.gguf_file import (
    GGUFTensor,
    _gguf,
    _StreamingFile,
    _StreamingWriter,
    _to_numpy,
    _types,
    gguf_arch,
    head_groups,
    permute_qk,
)
from loracook.io.gguf_tokenizer import _add_tokenizer, tokenizer_metadata


def _weight_qtype(shape: Sequence[int], file_type: str) -> Any:
    """llama.cpp's rule: 1-D tensors stay f32; q8_0 falls back to f16 for rows that are not whole blocks."""
    gguf = _gguf()
    qtype, _ = _types(file_type)
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % 32:
        return gguf.GGMLQuantizationType.F16
    return qtype


def model_specs(
    config: Mapping[str, Any], tensors: Iterable[tuple[str, Sequence[int]]], file_type: str
) -> list[GGUFTensor]:
    """The GGUF tensors of a model whose HF tensors (name, shape) arrive in this order.

    Tensors the GGUF does not hold are skipped (rotary ``inv_freq`` buffers, and lm_head when the embeddings
    are tied); a name the gguf tensor map does not know is a BadInput naming it."""
    gguf = _gguf()
    arch, permute = gguf_arch(config)
    n_layers = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(arch, n_layers)
    tied = bool(config.get("tie_word_embeddings"))
    specs: list[GGUFTensor] = []
    for hf_name, shape in tensors:
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise BadInput(
                f"GGUF export: no GGUF name for tensor {hf_name!r} of {config['architectures'][0]}"
            )
        transform = ""
        if permute and re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            transform = "permute_q"
        elif permute and re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            transform = "permute_k"
        shape = tuple(int(s) for s in shape)
        specs.append(GGUFTensor(hf_name, name, shape, _weight_qtype(shape, file_type), transform))
    return specs


def _head_dim(config: Mapping[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _check_rope(config: Mapping[str, Any]) -> None:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default"):
        raise BadInput(
            f"GGUF export does not write rope scaling {kind!r} yet",
            loc=("output", "format"),
            fix="write safetensors and convert with llama.cpp's convert_hf_to_gguf.py",
        )


def check_model_export(config: Mapping[str, Any], tokenizer_dir: str | Path | None, file_type: str) -> None:
    """Everything GGUFModelWriter would refuse, checked at validate/plan time without writing anything:
    the GGUF type, the architecture, rope scaling and the tokenizer."""
    _types(file_type)
    gguf_arch(config)
    _check_rope(config)
    if tokenizer_dir is not None:
        tokenizer_metadata(tokenizer_dir, int(config["vocab_size"]), config)


def _add_hparams(writer: Any, config: Mapping[str, Any], file_type: str, name: str | None) -> None:
    """The ``{arch}.*`` keys llama.cpp's converter writes for Llama/Mistral/Qwen2/Qwen3 and transformers reads."""
    _check_rope(config)
    rope = config.get("rope_parameters") or {}  # transformers 5 keeps rope_theta and rope_type here
    _, ftype = _types(file_type)
    writer.add_type("model")
    if name:
        writer.add_name(name)
    writer.add_file_type(int(ftype))
    if file_type == "q8_0":
        writer.add_quantization_version(_gguf().GGML_QUANT_VERSION)
    writer.add_context_length(int(config.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    rope_theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    writer.add_rope_freq_base(float(rope_theta))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config["hidden_size"] // config["num_attention_heads"]:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config["vocab_size"]))


class GGUFModelWriter(_StreamingWriter):
    """Stream a model into one GGUF file.

    >>> with GGUFModelWriter(out, config=cfg, tokenizer_dir=base, tensors=shapes, file_type="q8_0") as w:  # doctest: +SKIP
    ...     for name, tensor in merged_tensors():   # in the order of `tensors`
    ...         w.write(name, tensor)

    ``tensors`` lists (HF name, shape) in the order :meth:`write` will receive them; the file is complete
    and renamed into place when the ``with`` block ends (or :meth:`close`), and removed on an exception.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        config: Mapping[str, Any],
        tokenizer_dir: str | Path | None,
        tensors: Iterable[tuple[str, Sequence[int]]],
        file_type: str = "f16",
        name: str | None = None,
    ) -> None:
        gguf = _gguf()
        arch, _ = gguf_arch(config)
        self.config = dict(config)
        self.specs = model_specs(config, tensors, file_type)
        self._by_source = {spec.source: spec for spec in self.specs}
        self._pending: np.ndarray | None = None  # q/k rows waiting for the rest of their head
        tokenizer = (
            tokenizer_metadata(tokenizer_dir, int(config["vocab_size"]), config) if tokenizer_dir else {}
        )

        def fill(writer: Any) -> None:
            _add_hparams(writer, config, file_type, name)
            _add_tokenizer(writer, tokenizer)

        self._file = _StreamingFile(path, gguf.MODEL_ARCH_NAMES[arch], self.specs, fill)

    def write(self, hf_name: str, block: Any) -> None:
        """Append a tensor, or the next rows of it (a whole tensor is one block), in the declared order.

        Tensors the GGUF does not hold are skipped. Rows are converted at once, except q_proj/k_proj rows of
        a permuted architecture, which wait until they make whole heads (the permutation stays inside a
        head); the block's memory is not kept after this returns."""
        spec = self._by_source.get(hf_name)
        if spec is None:
            return  # dropped on purpose (tied lm_head, inv_freq): see model_specs
        self._check_next(hf_name, "GGUF tensors", hf_name)
        data = _to_numpy(block)
        if not spec.transform:
            self._file.append(spec, data)
            return
        groups = head_groups(self.config, spec.transform)
        rows_per_head = spec.shape[0] // groups
        pending = np.concatenate([self._pending, data]) if self._pending is not None else data
        whole = pending.shape[0] // rows_per_head * rows_per_head
        if whole:
            self._file.append(spec, permute_qk(pending[:whole], whole // rows_per_head))
        rest = pending[whole:]
        self._pending = np.array(rest, copy=True) if len(rest) else None  # the caller may reuse its buffer


class GGUFModelSink:
    """A model output as GGUF, behind the executor's sink protocol (``start(specs)``, ``write(name, rows)``,
    ``finish()``): ``specs`` are the plan's tensors in execution order (anything with ``name`` and
    ``shape``), and the file is renamed into place by ``finish``."""

    in_flight = 0  # write() converts (or copies) the rows before it returns

    def __init__(
        self,
        path: str | Path,
        *,
        config: Mapping[str, Any],
        tokenizer_dir: str | Path | None,
        file_type: str = "f16",
        name: str | None = None,
    ) -> None:
        self.path, self.config, self.tokenizer_dir = Path(path), dict(config), tokenizer_dir
        self.file_type, self.name = file_type, name
        self.writer: GGUFModelWriter | None = None

    def start(self, specs: Sequence[Any]) -> None:
        self.writer = GGUFModelWriter(
            self.path,
            config=self.config,
            tokenizer_dir=self.tokenizer_dir,
            tensors=[(spec.name, tuple(spec.shape)) for spec in specs],
            file_type=self.file_type,
            name=self.name,
        )

    def write(self, name: str, block: Any) -> None:
        assert self.writer is not None, "start() first"
        self.writer.write(name, block)

    def finish(self) -> None:
        assert self.writer is not None, "start() first"
        self.writer.close()

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
