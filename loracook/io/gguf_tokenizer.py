"""The ``tokenizer.*`` keys of a GGUF model, read from a HF tokenizer folder (byte-level BPE: tokens, merges,
token types, special ids, chat template), as llama.cpp's convert_hf_to_gguf.py writes them."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loracook.errors import BadInput
from loracook.io.gguf_file import _gguf

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
