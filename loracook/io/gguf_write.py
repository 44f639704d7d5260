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

The code lives in four modules, re-exported here: ``gguf_file`` (types, architectures, the streamed file),
``gguf_tokenizer`` (the tokenizer keys), ``gguf_model`` (models) and ``gguf_lora`` (llama.cpp LoRA adapters).
"""

from __future__ import annotations

from loracook.io.gguf_file import FILE_TYPES, GGUFTensor, gguf_arch, permute_qk
from loracook.io.gguf_lora import GGUFAdapterSink, GGUFLoraWriter, check_adapter_export, lora_alpha_and_gains
from loracook.io.gguf_model import GGUFModelSink, GGUFModelWriter, check_model_export, model_specs
from loracook.io.gguf_tokenizer import tokenizer_metadata

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
