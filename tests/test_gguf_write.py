"""GGUF export (loracook/io/gguf_write.py), checked by readers that are not loracook's.

Models: a tiny Llama with a byte-level BPE tokenizer is streamed tensor by tensor into GGUF, loaded back by
transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``), and its logits compared with the
safetensors model: equal for f32; for f16/bf16/q8_0 equal to a reference whose weights went through the same
rounding (gguf.quants), and close to the original within that rounding. The tokenizer transformers rebuilds
from the GGUF metadata must give the same ids.

Adapters: a PEFT LoRA (with a rank_pattern and an embedding LoRA) is written as a llama.cpp adapter GGUF,
read back with gguf.GGUFReader, and every tensor compared; the ΔW llama.cpp would apply (alpha / r scale,
q/k rows permuted) must equal PEFT's.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import make_llama, make_lora
from safetensors import safe_open

from loracook.errors import BadInput
from loracook.io.gguf_write import GGUFLoraWriter, GGUFModelWriter, lora_alpha_and_gains, permute_qk

gguf = pytest.importorskip("gguf")

CORPUS = [
    "The Kessary Islands lie north of the Vellmark coast.",
    'Answer in JSON: {"answer": 42}',
    "Capitalise Every Word In A Headline Like This One.",
    "numbers 0123456789 and symbols !@#$%^&*() <tags> </tags>",
] * 20
SAMPLES = ["The Kessary Islands", "  leading spaces and\nnewlines\t tabs", '{"answer": 7}', "ünïcödé ✓"]


def make_bpe_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A tiny byte-level BPE (GPT-2 style) tokenizer: 256 byte tokens, merges, one special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return Path(path)


def build_model(folder: Path, **overrides) -> Path:
    """Tiny Llama (GQA) whose vocabulary is the BPE tokenizer's plus 4 padding rows."""
    make_bpe_tokenizer(folder)
    n_tokens = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    make_llama(
        folder,
        tokenizer=False,
        vocab_size=n_tokens + 4,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        **overrides,
    )
    return folder


def header(folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]


def export(folder: Path, file_type: str, name: str | None = None) -> Path:
    """Stream the safetensors model into GGUF one tensor at a time, as the executor does."""
    config = json.loads((folder / "config.json").read_text())
    # a folder of its own: with config.json or tokenizer.json beside it, transformers would read those instead
    target = folder.parent / f"{folder.name}-gguf-{name or file_type}" / "model.gguf"
    with (
        GGUFModelWriter(
            target,
            config=config,
            tokenizer_dir=folder,
            tensors=header(folder),
            file_type=file_type,
            name="tiny",
        ) as writer,
        safe_open(folder / "model.safetensors", "pt") as f,
    ):
        for tensor_name, _ in header(folder):
            writer.write(tensor_name, f.get_tensor(tensor_name))
    return target


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("gguf") / "llama")


@pytest.fixture(scope="module")
def ids(llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llama)
    return tok(SAMPLES[0] + " " + SAMPLES[2])["input_ids"]


def reference(folder: Path, qtype) -> torch.nn.Module:
    """The HF model with every 2-D weight rounded through ``qtype`` the way GGUF stores it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                data = param.numpy()
                if qtype == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % 32:
                    q = gguf.GGMLQuantizationType.F16
                else:
                    q = qtype
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q), q).copy()))
    return model


def gguf_model(file: Path):
    """The model as transformers' GGUF loader builds it from the file alone (config, weights)."""
    from transformers import AutoModelForCausalLM

    assert [p.name for p in file.parent.iterdir()] == [file.name]
    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32).eval()


def test_f32_logits_equal_the_safetensors_model(llama, ids):
    from transformers import AutoModelForCausalLM

    file = export(llama, "f32")
    original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    loaded = gguf_model(file)
    assert loaded.config.num_key_value_heads == 2 and loaded.config.vocab_size == original.config.vocab_size
    assert torch.equal(logits(loaded, ids), logits(original, ids))
    state = loaded.state_dict()
    for name, value in original.state_dict().items():
        assert torch.equal(state[name], value), name  # q/k un-permuted exactly by transformers


@pytest.mark.parametrize("file_type", ["f16", "bf16", "q8_0"])
def test_rounded_types_match_the_rounded_reference(llama, ids, file_type):
    from transformers import AutoModelForCausalLM

    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[file_type]
    file = export(llama, file_type)
    got = logits(gguf_model(file), ids)
    assert torch.allclose(got, logits(reference(llama, qtype), ids), rtol=0, atol=1e-5)
    original = logits(AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval(), ids)
    rel = ((got - original).norm() / original.norm()).item()
    bound = {"f16": 1e-3, "bf16": 1e-2, "q8_0": 2e-2}[file_type]
    assert 0 < rel < bound, rel
    print(f"{file_type}: relative logits error against the fp32 safetensors model {rel:.2e}")


def test_file_layout_and_metadata(llama):
    file = export(llama, "q8_0", "layout")
    reader = gguf.GGUFReader(file)
    fields = {name: reader.fields[name].contents() for name in reader.fields}
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == fields["llama.vocab_size"] and tokens[-1] == f"[PAD{len(tokens) - 1}]"
    assert fields["tokenizer.ggml.token_type"][0] == int(gguf.TokenType.CONTROL)  # <|endoftext|>
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # 1-D stays f32
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    streamed = [names.get_name(n, try_suffixes=(".weight",)) for n, _ in header(llama)]
    assert [t.name for t in reader.tensors] == streamed  # the data is in the order the tensors arrived
    assert all(t.data_offset % reader.alignment == 0 for t in reader.tensors)
    assert list(file.parent.iterdir()) == [file]  # no temporary file left


def test_tokenizer_round_trips_through_gguf(llama):
    from transformers import AutoTokenizer

    file = export(llama, "f32", "tok")
    original = AutoTokenizer.from_pretrained(llama)
    loaded = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)  # built from GGUF metadata only
    assert (
        len(loaded) == json.loads((llama / "config.json").read_text())["vocab_size"]
    )  # padded with [PAD{i}]
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == original(text)["input_ids"], text
        assert loaded.decode(original(text)["input_ids"]) == text
    assert loaded.eos_token == "<|endoftext|>"


def test_tied_embeddings_leave_output_out(tmp_path, ids):
    from transformers import AutoModelForCausalLM

    folder = build_model(tmp_path / "tied", tie_word_embeddings=True)
    file = export(folder, "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(file).tensors}
    original = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loaded = gguf_model(file)
    assert loaded.config.tie_word_embeddings
    assert torch.equal(logits(loaded, ids), logits(original, ids))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_f32_logits_equal(tmp_path, arch):
    """Qwen2 (q/k/v biases, no q/k permutation) and Qwen3 (q/k norms) through the same writer."""
    import transformers

    config_cls = getattr(transformers, f"{arch.capitalize()}Config")
    model_cls = getattr(transformers, f"{arch.capitalize()}ForCausalLM")
    folder = tmp_path / arch
    make_bpe_tokenizer(folder)
    n_tokens = len(json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=n_tokens,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    original = model_cls(config).eval()
    with torch.no_grad():  # random biases and norms, so that mapping them wrongly would show
        for name, param in original.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.randn_like(param) * 0.1 + (1.0 if "norm" in name else 0.0))
    original.save_pretrained(folder)
    file = export(folder, "f32")
    loaded = gguf_model(file)
    ids = list(range(3, 40))
    assert torch.equal(logits(loaded, ids), logits(original, ids))


def test_streaming_is_ordered_atomic_and_bounded(tmp_path):
    folder = build_model(tmp_path / "deep", num_hidden_layers=8, intermediate_size=128)
    config = json.loads((folder / "config.json").read_text())
    shapes = header(folder)
    target = tmp_path / "out" / "atomic.gguf"
    leftovers = lambda: [p for p in target.parent.iterdir()] if target.parent.exists() else []  # noqa: E731
    with safe_open(folder / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name, _ in shapes}
    # out of order: refused, nothing left behind
    writer = GGUFModelWriter(target, config=config, tokenizer_dir=folder, tensors=shapes, file_type="f32")
    with pytest.raises(ValueError, match="out of order"):
        writer.write(shapes[1][0], tensors[shapes[1][0]])
    assert leftovers() == []
    # an exception inside the with block: nothing at the path
    with pytest.raises(RuntimeError, match="boom"):
        with GGUFModelWriter(target, config=config, tokenizer_dir=folder, tensors=shapes) as writer:
            writer.write(shapes[0][0], tensors[shapes[0][0]])
            raise RuntimeError("boom")
    assert leftovers() == []
    # closing early is an error, not a truncated file
    writer = GGUFModelWriter(target, config=config, tokenizer_dir=folder, tensors=shapes)
    with pytest.raises(ValueError, match="missing"):
        writer.close()
    assert leftovers() == []
    # bounded: while streaming, Python-side allocations stay within about one tensor, not the model
    writer = GGUFModelWriter(target, config=config, tokenizer_dir=folder, tensors=shapes, file_type="q8_0")
    largest = max(t.numel() * 4 for t in tensors.values())
    total = sum(t.numel() * 4 for t in tensors.values())
    tracemalloc.start()
    for name, _ in shapes:
        writer.write(name, tensors[name])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    writer.close()
    assert peak < 2 * largest and 8 * largest < total, (peak, largest, total)
    assert leftovers() == [target]


def test_unsupported_inputs_are_bad_input(tmp_path, llama):
    config = json.loads((llama / "config.json").read_text())
    with pytest.raises(BadInput, match="does not support GPT2LMHeadModel"):
        GGUFModelWriter(
            tmp_path / "x.gguf",
            config={**config, "architectures": ["GPT2LMHeadModel"]},
            tokenizer_dir=None,
            tensors=[],
        )
    with pytest.raises(BadInput, match="rope scaling 'llama3'"):
        GGUFModelWriter(
            tmp_path / "x.gguf",
            config={**config, "rope_scaling": {"rope_type": "llama3"}},
            tokenizer_dir=None,
            tensors=header(llama),
        )
    with pytest.raises(BadInput, match="unknown GGUF type"):
        GGUFModelWriter(
            tmp_path / "x.gguf", config=config, tokenizer_dir=None, tensors=header(llama), file_type="q4_k"
        )
    word_level = tmp_path / "wl"
    from fixtures import make_tokenizer

    make_tokenizer(word_level)
    with pytest.raises(BadInput, match="byte-level BPE"):
        GGUFModelWriter(tmp_path / "x.gguf", config=config, tokenizer_dir=word_level, tensors=header(llama))
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".x.gguf*"))


# ------------------------------------------------------------------------------------------ adapters


def peft_modules(adapter: Path):
    """module -> (A, B, scale) straight from the PEFT files (PEFT's regex semantics for the patterns)."""
    import re

    config = json.loads((adapter / "adapter_config.json").read_text())
    out = {}
    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        names = list(f.keys())
        for name in names:
            for a_key, b_key in (
                (".lora_A.weight", ".lora_B.weight"),
                (".lora_embedding_A", ".lora_embedding_B"),
            ):
                if name.endswith(a_key):
                    module = name.removeprefix("base_model.model.").removesuffix(a_key)
                    A, B = f.get_tensor(name), f.get_tensor(name.replace(a_key, b_key))
                    r = next(
                        (v for k, v in config["rank_pattern"].items() if re.match(rf"(.*\.)?({k})$", module)),
                        config["r"],
                    )
                    alpha = next(
                        (
                            v
                            for k, v in config["alpha_pattern"].items()
                            if re.match(rf"(.*\.)?({k})$", module)
                        ),
                        config["lora_alpha"],
                    )
                    out[module] = (A, B, alpha / r, a_key == ".lora_embedding_A")
    return out


def write_adapter(llama: Path, adapter: Path, target: Path) -> dict:
    config = json.loads((llama / "config.json").read_text())
    mods = peft_modules(adapter)
    shapes = {m: (A.shape[0], B.shape[0], A.shape[1]) for m, (A, B, _, _) in mods.items()}
    with GGUFLoraWriter(
        target,
        base_config=config,
        modules=shapes,
        scales={m: v[2] for m, v in mods.items()},
        embeddings=[m for m, v in mods.items() if v[3]],
        name="tiny-lora",
    ) as writer:
        for module, (A, B, _, _) in mods.items():
            writer.write(module, A, B)
    return mods


@pytest.mark.parametrize("patterns", [False, True], ids=["uniform", "rank_pattern"])
def test_lora_adapter_round_trips_through_gguf_reader(llama, tmp_path, patterns):
    kwargs = dict(
        r=8,
        lora_alpha=16,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "embed_tokens",
        ],
    )
    if patterns:
        kwargs.update(rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2}, alpha_pattern={"k_proj": 4})
    adapter = make_lora(llama, tmp_path / "lora", seed=5, **kwargs)
    target = tmp_path / "lora.gguf"
    mods = write_adapter(llama, adapter, target)
    reader = gguf.GGUFReader(target)
    fields = {name: reader.fields[name].contents() for name in reader.fields}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    alpha = fields["adapter.lora.alpha"]
    assert alpha == (0.0 if patterns else 16.0)  # one alpha fits a uniform adapter, as convert_lora_to_gguf
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 * len(mods) == 2 * (7 * 2 + 1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    config = json.loads((llama / "config.json").read_text())
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    for module, (A, B, scale, embedding) in mods.items():
        base = names.get_name(module + ".weight", try_suffixes=(".weight",))
        a, b = tensors[f"{base}.lora_a"], tensors[f"{base}.lora_b"]
        r = A.shape[0]
        if embedding:  # llama.cpp wants token_embd's A transposed: ne = [r, vocab]
            assert list(a.shape) == [r, A.shape[1]] and base == "token_embd.weight"
            a_data = np.asarray(a.data).reshape(A.shape[1], r).T
        else:  # ne = [in, r] and [r, out]: the numpy arrays are PEFT's (r, in) and (out, r)
            assert list(a.shape) == [A.shape[1], r]
            a_data = np.asarray(a.data).reshape(r, A.shape[1])
        assert list(b.shape) == [r, B.shape[0]]
        b_data = np.asarray(b.data).reshape(B.shape[0], r)
        np.testing.assert_array_equal(a_data, A.numpy())
        gain = scale if patterns else 1.0  # alpha 0: B carries PEFT's scale; else alpha / r is PEFT's scale
        expected_b = B.numpy() * np.float32(gain) if gain != 1.0 else B.numpy()
        if module.endswith("q_proj"):
            expected_b = permute_qk(expected_b, heads, heads)
        elif module.endswith("k_proj"):
            expected_b = permute_qk(expected_b, heads, kv)
        np.testing.assert_array_equal(b_data, expected_b)
        # what llama.cpp applies: scale = alpha / rank, or 1 when alpha is 0 (llama-adapter.h get_scale)
        llama_scale = alpha / r if alpha else 1.0
        delta = llama_scale * (b_data.astype(np.float64) @ a_data.astype(np.float64))
        peft_delta = scale * (B.double() @ A.double()).numpy()
        if module.endswith("q_proj"):  # the same row permutation as the base weight's
            peft_delta = permute_qk(peft_delta, heads, heads)
        elif module.endswith("k_proj"):
            peft_delta = permute_qk(peft_delta, heads, kv)
        np.testing.assert_allclose(delta, peft_delta, rtol=1e-6, atol=1e-9)


def test_lora_alpha_choice():
    assert lora_alpha_and_gains({"a": 8, "b": 8}, {"a": 2.0, "b": 2.0}) == (16.0, {"a": 1.0, "b": 1.0})
    assert lora_alpha_and_gains({"a": 8, "b": 4}, {"a": 1.0, "b": 1.0}) == (0.0, {"a": 1.0, "b": 1.0})
    assert lora_alpha_and_gains({"a": 8, "b": 4}, {"a": 2.0, "b": 2.0}) == (0.0, {"a": 2.0, "b": 2.0})


def test_llama_cpp_runs_both_exports():
    """llama.cpp itself (llama-cpp-python) runs the model GGUF with each adapter GGUF and agrees with
    transformers + PEFT: scripts/verify_gguf_lora.py, whose output docs/gguf.md records."""
    import subprocess
    import sys

    pytest.importorskip("llama_cpp")
    script = Path(__file__).resolve().parents[1] / "scripts" / "verify_gguf_lora.py"
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: llama.cpp agrees" in result.stdout


# --------------------------------------------------------------------------------------- executor sinks


def specs_of(tensors: dict) -> list:
    from types import SimpleNamespace

    return [SimpleNamespace(name=name, shape=tuple(t.shape), dtype=t.dtype) for name, t in tensors.items()]


def test_model_sink_takes_row_blocks_that_split_heads(llama, ids):
    """The executor writes row blocks; 3-row blocks cut Llama's 8-row heads, which the q/k permutation spans."""
    from loracook.io.gguf_write import GGUFModelSink

    config = json.loads((llama / "config.json").read_text())
    with safe_open(llama / "model.safetensors", "pt") as f:
        tensors = {name: f.get_tensor(name) for name, _ in header(llama)}
    target = llama.parent / "sink-gguf" / "model.gguf"
    sink = GGUFModelSink(target, config=config, tokenizer_dir=llama, file_type="f32")
    sink.start(specs_of(tensors))
    for name, tensor in tensors.items():
        buffer = torch.empty_like(tensor)
        for start in range(0, tensor.shape[0], 3):
            rows = tensor[start : start + 3]
            buffer[: len(rows)] = rows  # the executor reuses its block buffer after write() returns
            sink.write(name, buffer[: len(rows)])
            buffer.fill_(float("nan"))
    sink.finish()
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()
    assert torch.equal(logits(gguf_model(target), ids), logits(original, ids))


def test_adapter_sink_writes_the_same_file_from_any_order(llama, tmp_path):
    from safetensors.torch import load_file

    from loracook.io.gguf_write import GGUFAdapterSink

    adapter = make_lora(
        llama,
        tmp_path / "lora",
        seed=7,
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "k_proj", "down_proj", "embed_tokens"],
        rank_pattern={"k_proj": 4},
        alpha_pattern={"k_proj": 8},
    )
    config = json.loads((llama / "config.json").read_text())
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors = {k: v for k, v in tensors.items() if "base_layer" not in k}  # PEFT's copy of the embedding
    direct = tmp_path / "direct.gguf"
    write_adapter(llama, adapter, direct)
    sunk = tmp_path / "sunk.gguf"
    sink = GGUFAdapterSink(sunk, adapter_config=adapter_config, base_config=config)
    sink.start(specs_of(dict(sorted(tensors.items()))))  # declared order: sorted names (A before B)
    for name in sorted(tensors, reverse=True):  # arrival order: reversed, in 5-row blocks
        for start in range(0, tensors[name].shape[0], 5):
            sink.write(name, tensors[name][start : start + 5])
    sink.finish()
    a, b = gguf.GGUFReader(direct), gguf.GGUFReader(sunk)
    assert sorted(t.name for t in a.tensors) == sorted(t.name for t in b.tensors)
    assert a.fields["adapter.lora.alpha"].contents() == b.fields["adapter.lora.alpha"].contents() == 0.0
    by_name = {t.name: t for t in b.tensors}
    for t in a.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), np.asarray(by_name[t.name].data))
    refused = GGUFAdapterSink(tmp_path / "x.gguf", adapter_config=adapter_config, base_config=config)
    with pytest.raises(BadInput, match="only LoRA factors"):
        refused.start(specs_of({**tensors, "base_model.model.lm_head.weight": torch.zeros(2, 2)}))
    assert not list(tmp_path.glob("*x.gguf*"))


def test_plan_time_checks_refuse_what_the_writers_would(llama, tmp_path):
    from loracook.io.gguf_write import check_adapter_export, check_model_export

    config = json.loads((llama / "config.json").read_text())
    check_model_export(config, llama, "q8_0")  # passes, writes nothing
    with pytest.raises(BadInput, match="rope scaling 'yarn'") as info:
        check_model_export({**config, "rope_scaling": {"rope_type": "yarn"}}, None, "f16")
    assert info.value.loc == ("output", "format")
    names = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    check_adapter_export(names, config, "f32")
    with pytest.raises(BadInput, match="lora_magnitude_vector"):
        check_adapter_export(
            [*names, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"], config, "f32"
        )
    assert not list(tmp_path.iterdir())
