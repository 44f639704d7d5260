"""The GGUF file that the model and LoRA writers share: GGML types, the architectures loracook converts, llama.cpp's
q/k row permutation, and a file streamed tensor by tensor (header and tensor table first, then each tensor's data
appended as it arrives, converted in row blocks, in a temporary file renamed into place by ``close``).

This module imports torch only to accept torch tensors; the conversion itself is numpy + ``gguf.quants``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from loracook.errors import BadInput

# output.dtype / file type name -> (GGML type of 2-D tensors, llama.cpp's general.file_type)
FILE_TYPES = ("f32", "f16", "bf16", "q8_0")

# HF architecture -> (gguf MODEL_ARCH name, permute q/k rows as llama.cpp's LlamaModel does)
_ARCHES: dict[str, tuple[str, bool]] = {
    "LlamaForCausalLM": ("LLAMA", True),
    "MistralForCausalLM": ("LLAMA", True),
    "Qwen2ForCausalLM": ("QWEN2", False),
    "Qwen3ForCausalLM": ("QWEN3", False),
}

# Rows converted at a time: bounds the float32 scratch of one conversion to about 64 MiB.
_BLOCK_BYTES = 64 * 2**20


def _gguf():
    try:
        import gguf
    except ImportError:  # pragma: no cover - a dependency of loracook
        raise BadInput("writing GGUF needs the gguf package", fix="pip install gguf") from None
    return gguf


def _types(file_type: str):
    gguf = _gguf()
    q, f = gguf.GGMLQuantizationType, gguf.LlamaFileType
    table = {
        "f32": (q.F32, f.ALL_F32),
        "f16": (q.F16, f.MOSTLY_F16),
        "bf16": (q.BF16, f.MOSTLY_BF16),
        "q8_0": (q.Q8_0, f.MOSTLY_Q8_0),
    }
    if file_type not in table:
        raise BadInput(
            f"unknown GGUF type {file_type!r}",
            loc=("output", "format"),
            fix=f"use one of {', '.join(FILE_TYPES)}",
        )
    return table[file_type]


def gguf_arch(config: Mapping[str, Any]) -> tuple[Any, bool]:
    """The gguf ``MODEL_ARCH`` of a HF config and whether q/k rows are permuted; BadInput if unsupported."""
    gguf = _gguf()
    arch = (config.get("architectures") or [None])[0]
    if arch not in _ARCHES:
        raise BadInput(
            f"GGUF export does not support {arch} yet (supported: {', '.join(_ARCHES)})",
            loc=("output", "format"),
            fix="write safetensors and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    name, permute = _ARCHES[arch]
    return getattr(gguf.MODEL_ARCH, name), permute


def permute_qk(weights: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp's row permutation of q_proj/k_proj (convert_hf_to_gguf.py ``LlamaModel.permute``): within
    each head, the interleaved rotary pairs become two halves. Works on weights (out, in), biases (out,) and
    LoRA B factors (out, r); transformers' GGUF loader applies the inverse."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def head_groups(config: Any, transform: str) -> int:
    """The heads a q_proj/k_proj permutation works in: the attention heads for q, the key-value heads for k."""
    heads = int(config["num_attention_heads"])
    return heads if transform == "permute_q" else int(config.get("num_key_value_heads") or heads)


def _to_numpy(tensor: Any) -> np.ndarray:
    """A float32 or float16 numpy view of a torch tensor or numpy array (bf16 is widened to float32)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    import torch

    tensor = tensor.detach()
    if tensor.dtype not in (torch.float32, torch.float16):
        tensor = tensor.to(torch.float32)
    return tensor.cpu().contiguous().numpy()


# ------------------------------------------------------------------------------------------- the file


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of the GGUF file: where it comes from, its GGUF name, its shape (numpy order, rows first)
    and GGML type."""

    source: str  # the HF tensor name (models) or module name + ".lora_a"/".lora_b" (adapters)
    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    transform: str = ""  # "permute_q" | "permute_k" | "transpose" | ""

    @property
    def nbytes(self) -> int:
        gguf = _gguf()
        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * (self.shape[-1] // block) * size


class _StreamingFile:
    """A GGUF file whose header and tensor table are written up front and whose data is appended tensor by
    tensor in the declared order, into a temporary file renamed into place by :meth:`close`."""

    def __init__(self, path: str | Path, arch_name: str, specs: Sequence[GGUFTensor], fill_metadata) -> None:
        gguf = _gguf()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.temp = Path(temp)
        self.specs = list(specs)
        self._next = 0
        self._rows = self._bytes = 0  # of the tensor being written
        self._writer = gguf.GGUFWriter(self.temp, arch=arch_name)
        try:
            fill_metadata(self._writer)
            for spec in self.specs:
                self._writer.add_tensor_info(
                    spec.name, spec.shape, np.dtype(np.float32), spec.nbytes, raw_dtype=spec.qtype
                )
            self._writer.write_header_to_file(self.temp)
            self._writer.write_kv_data_to_file()
            self._writer.write_ti_data_to_file()
            self._fout = self._writer.fout[0]
            self._align = self._writer.data_alignment
            self._pad()
        except BaseException:
            self.abort()
            raise

    def _pad(self) -> None:
        pad = -self._fout.tell() % self._align
        if pad:
            self._fout.write(b"\0" * pad)

    @property
    def expected(self) -> GGUFTensor | None:
        return self.specs[self._next] if self._next < len(self.specs) else None

    def append(self, spec: GGUFTensor, data: np.ndarray) -> None:
        """Append rows of ``spec`` (numpy order, float): the whole tensor, or the next rows of it. Rows are
        converted to ``spec.qtype`` in blocks (GGML types quantize each row on its own), and the tensor's
        padding is written after its last row."""
        gguf = _gguf()
        if self.expected is not spec:
            raise ValueError(f"GGUF tensors out of order: got {spec.source}, expected {self.expected}")
        if data.ndim != len(spec.shape) or tuple(data.shape[1:]) != spec.shape[1:]:
            raise ValueError(f"{spec.source}: block shape {tuple(data.shape)} does not fit {spec.shape}")
        if data.ndim > 1:
            rows, total_rows = data.reshape(-1, spec.shape[-1]), int(np.prod(spec.shape[:-1]))
        else:  # 1-D tensors stay f32, an element-wise conversion: any slice of them is a block
            rows, total_rows = data.reshape(-1, 1), spec.shape[0]
        if self._rows + rows.shape[0] > total_rows:
            raise ValueError(f"{spec.source}: more rows than the declared {spec.shape}")
        step = max(1, _BLOCK_BYTES // max(1, rows.shape[1] * 4))
        for start in range(0, rows.shape[0], step):
            block = np.ascontiguousarray(rows[start : start + step], dtype=np.float32)
            out = gguf.quants.quantize(block, spec.qtype)
            self._fout.write(out.tobytes())
            self._bytes += out.nbytes
        self._rows += rows.shape[0]
        if self._rows == total_rows:
            if self._bytes != spec.nbytes:  # pragma: no cover - a bug in the size arithmetic
                raise AssertionError(f"{spec.name}: wrote {self._bytes} bytes, declared {spec.nbytes}")
            self._pad()
            self._next += 1
            self._rows = self._bytes = 0

    def close(self) -> Path:
        if self.expected is not None:
            missing = [s.source for s in self.specs[self._next :]]
            self.abort()
            raise ValueError(f"GGUF closed before all tensors arrived; missing {missing[:5]}")
        self._writer.close()
        os.replace(self.temp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        except Exception:  # noqa: BLE001 - cleaning up after another error
            pass
        self.temp.unlink(missing_ok=True)


_Writer = TypeVar("_Writer", bound="_StreamingWriter")


class _StreamingWriter:
    """What both GGUF writers do with their :class:`_StreamingFile` (``self._file``) once the tensors are in:
    :meth:`close` renames it into place, :meth:`abort` removes it, and a ``with`` block does one or the other."""

    _file: _StreamingFile

    def _check_next(self, source: str, what: str, got: str) -> None:
        """Abort the file and raise unless ``source`` is the tensor the file expects next."""
        expected = self._file.expected
        if expected is None or expected.source != source:
            self.abort()
            raise ValueError(f"{what} out of order: got {got}, expected {expected and expected.source}")

    def close(self) -> Path:
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self: _Writer) -> _Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _block(qtype: Any) -> int:
    return _gguf().GGML_QUANT_SIZES[qtype][0]
