"""GGUF output for llama.cpp and Ollama: a whole model (f32, f16, bf16, q8_0) or a llama.cpp LoRA adapter.

Both writers stream. The plan knows every tensor's name and shape before the first byte is merged, so the
header, the metadata and the tensor table are written first (GGUF puts them before the data, with each
tensor's offset), and then each tensor's data is appended the moment it arrives, converted in row blocks:
the writer holds one tensor, never the model. Everything goes to a temporary file next to the target that is
renamed into place by :meth:`close`, so an interrupted run leaves nothing at the output path.

What the files contain is what llama.cpp's own converters write (convert_hf_to_gguf.py and
convert_lora_to_gguf.py), through the ``gguf`` package's tensor-name map:

- models: the architecture's hyper-parameters under ``{arch}.*``, the tokenizer (byte-level BPE: tokens,
  merges, token types, special ids, chat template), 1-D tensors in f32 and the rest in the chosen type; the
  rows of Llama's q_proj/k_proj are permuted the way llama.cpp's rotary embedding wants them (transformers'
  GGUF loader undoes it), and a tied lm_head is left out (both readers reuse token_embd);
- adapters: ``general.type = adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per module
  ``<base tensor>.lora_a`` (ne = [in, r]) and ``<base tensor>.lora_b`` (ne = [r, out]).

This module imports torch only to accept torch tensors; the conversion itself is numpy + ``gguf.quants``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loracook.errors import BadInput

__all__ = [
    "FILE_TYPES",
    "GGUFAdapterSink",
    "GGUFLoraWriter",
    "GGUFModelSink",
    "GGUFModelWriter",
    "GGUFTensor",
    "check_adapter_export",
    "check_model_export",
    "gguf_arch",
    "lora_alpha_and_gains",
    "model_specs",
    "permute_qk",
    "tokenizer_metadata",
]

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


# ------------------------------------------------------------------------------------------- models


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


class GGUFModelWriter:
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
        expected = self._file.expected
        if expected is None or expected.source != hf_name:
            self.abort()
            raise ValueError(
                f"GGUF tensors out of order: got {hf_name}, expected {expected and expected.source}"
            )
        data = _to_numpy(block)
        if not spec.transform:
            self._file.append(spec, data)
            return
        heads = int(self.config["num_attention_heads"])
        groups = (
            heads if spec.transform == "permute_q" else int(self.config.get("num_key_value_heads") or heads)
        )
        rows_per_head = spec.shape[0] // groups
        pending = np.concatenate([self._pending, data]) if self._pending is not None else data
        whole = pending.shape[0] // rows_per_head * rows_per_head
        if whole:
            self._file.append(spec, permute_qk(pending[:whole], whole // rows_per_head))
        rest = pending[whole:]
        self._pending = np.array(rest, copy=True) if len(rest) else None  # the caller may reuse its buffer

    def close(self) -> Path:
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> GGUFModelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ----------------------------------------------------------------------------------------- tokenizer

# Pre-tokenizer names llama.cpp (and transformers' GGUF reader) know, keyed by the split regex in
# tokenizer.json: Llama 3 and Qwen2 (from transformers' gguf_tokenizer_mapping).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_KNOWN_SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _pre_tokenizer_name(pre: Mapping[str, Any] | None) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE's pre-tokenizer (``default`` when unknown)."""
    if not pre:
        return "default"
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        return _KNOWN_SPLITS.get(pattern, "default")
    return "default"


def _chat_template(folder: Path, tokenizer_config: Mapping[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    jinja = folder / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return template if isinstance(template, str) else None


def _special_id(
    name: str, tok_config: Mapping[str, Any], vocab: Mapping[str, int], config: Mapping[str, Any]
):
    token = tok_config.get(name)
    if isinstance(token, dict):
        token = token.get("content")
    if isinstance(token, str) and token in vocab:
        return vocab[token]
    value = config.get(f"{name}_id")
    return value if isinstance(value, int) else None


def tokenizer_metadata(folder: str | Path, vocab_size: int, config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.*`` GGUF keys of a HF tokenizer folder (tokenizer.json of a byte-level BPE).

    Tokens are listed by id and padded to the model's ``vocab_size`` with ``[PAD{i}]`` (type UNUSED), as
    convert_hf_to_gguf.py does; added special tokens are CONTROL, other added tokens USER_DEFINED. Whether
    BOS/EOS are added is read from what the tokenizer does to a sample text."""
    gguf = _gguf()
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise BadInput("GGUF export needs the base's tokenizer.json", file=folder, fix="add a fast tokenizer")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    pre = data.get("pre_tokenizer")
    byte_level = model.get("type") == "BPE" and "ByteLevel" in json.dumps(pre or {})
    if not byte_level:
        raise BadInput(
            f"GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM); this one is a"
            f" {model.get('type')} model with pre-tokenizer {(pre or {}).get('type')}",
            file=path,
            fix="write safetensors and convert with llama.cpp's convert_hf_to_gguf.py",
        )
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    if max(vocab.values()) >= vocab_size:
        raise BadInput(
            f"the tokenizer has ids up to {max(vocab.values())} but the model only {vocab_size} rows"
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for token, index in vocab.items():
        tokens[index], types[index] = token, gguf.TokenType.NORMAL
    for added in data.get("added_tokens") or []:
        index = added["id"]
        types[index] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    tok_config_path = folder / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text(encoding="utf-8")) if tok_config_path.is_file() else {}
    special = {
        n: _special_id(n, tok_config, vocab, config)
        for n in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    sample = tok.encode("a").ids
    meta: dict[str, Any] = {
        "model": "gpt2",
        "pre": _pre_tokenizer_name(pre),
        "tokens": tokens,
        "types": [int(t) for t in types],
        "merges": merges,
        "special": special,
        "add_bos": special["bos_token"] is not None and sample[:1] == [special["bos_token"]],
        "add_eos": special["eos_token"] is not None and sample[-1:] == [special["eos_token"]],
        "chat_template": _chat_template(folder, tok_config),
    }
    return meta


def _add_tokenizer(writer: Any, meta: Mapping[str, Any]) -> None:
    if not meta:
        return
    writer.add_tokenizer_model(meta["model"])
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    if meta["merges"]:
        writer.add_token_merges(meta["merges"])
    adders = {
        "bos_token": writer.add_bos_token_id,
        "eos_token": writer.add_eos_token_id,
        "unk_token": writer.add_unk_token_id,
        "pad_token": writer.add_pad_token_id,
    }
    for key, add in adders.items():
        if meta["special"].get(key) is not None:
            add(int(meta["special"][key]))
    writer.add_add_bos_token(bool(meta["add_bos"]))
    writer.add_add_eos_token(bool(meta["add_eos"]))
    if meta.get("chat_template"):
        writer.add_chat_template(meta["chat_template"])


# ------------------------------------------------------------------------------------------ adapters


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


class GGUFLoraWriter:
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
            expected = self._file.expected
            if expected is None or expected.source != spec.source:
                self.abort()
                raise ValueError(
                    f"LoRA modules out of order: got {module}, expected {expected and expected.source}"
                )
            data = _to_numpy(tensor).astype(np.float32, copy=False)
            if suffix == ".lora_b":
                gain = self.gains[module]
                if gain != 1.0:
                    data = data * np.float32(gain)
                if spec.transform:
                    heads = int(self.config["num_attention_heads"])
                    kv = int(self.config.get("num_key_value_heads") or heads)
                    data = permute_qk(data, heads, heads if spec.transform == "permute_q" else kv)
            elif spec.transform == "transpose":
                data = np.ascontiguousarray(data.T)
            self._file.append(spec, data)

    def close(self) -> Path:
        return self._file.close()

    def abort(self) -> None:
        self._file.abort()

    def __enter__(self) -> GGUFLoraWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _block(qtype: Any) -> int:
    return _gguf().GGML_QUANT_SIZES[qtype][0]


# ---------------------------------------------------------------------------------- executor sinks


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
