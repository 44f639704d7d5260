"""Builders for tiny real models and real PEFT adapters, and helpers to drive the CLI.

Everything here is deliberately independent of loracook's engine: models come from transformers, adapters from
PEFT (``get_peft_model`` + ``save_pretrained``), and tensors are read straight from safetensors files. Tests
compare loracook's output against these, never against loracook itself.

    >>> base = make_llama(tmp / "llama")                                   # doctest: +SKIP
    >>> ad = make_lora(base, tmp / "ad", seed=1, r=8, lora_alpha=16, target_modules=["q_proj"])  # doctest: +SKIP
    >>> recipe = write_recipe(tmp, {"loracook": 1, "base": str(base), ...})  # doctest: +SKIP
    >>> res = run_cli(["run", str(recipe)], capfd)                         # doctest: +SKIP
    >>> res.code, res.err_lines                                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every linear projection of a Llama block.
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_EVALUATE_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ----------------------------------------------------------------------------------------------------------
# Models


def make_tokenizer(path: Path) -> Path:
    """A character-level tokenizer with fewer than 128 tokens (fits every tiny model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for ch in string.ascii_letters + string.digits + string.punctuation + " ":
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)
    return Path(path)


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA: k_proj/v_proj are 32 -> 16, so shapes are not all square
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def make_llama(
    path: Path,
    *,
    seed: int = 0,
    shard_size: str | None = None,
    tokenizer: bool = True,
    dtype: torch.dtype = torch.float32,
    **config_overrides: Any,
) -> Path:
    """A random tiny LlamaForCausalLM saved with ``save_pretrained`` (safetensors, fp32 unless ``dtype``)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**config_overrides)).eval().to(dtype)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    if tokenizer:
        make_tokenizer(path)
    return Path(path)


def make_gpt2(path: Path, *, seed: int = 0, tokenizer: bool = True) -> Path:
    """A random tiny GPT2LMHeadModel: Conv1D layers (weights stored in x out) and tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    if tokenizer:
        make_tokenizer(path)
    return Path(path)


def reshard(src: Path, dst: Path, shard_size: str) -> Path:
    """Re-save a model folder with a small ``max_shard_size`` so it has an index and several shards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(dst, max_shard_size=shard_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / name).exists():
            (Path(dst) / name).write_bytes((Path(src) / name).read_bytes())
    assert (Path(dst) / "model.safetensors.index.json").exists(), "reshard did not produce an index"
    return Path(dst)


# ----------------------------------------------------------------------------------------------------------
# Adapters


def make_lora(
    base: Path,
    path: Path,
    *,
    seed: int,
    scale: float = 0.1,
    magnitude_jitter: bool = True,
    save_embedding_layers: bool | str = "auto",
    **lora_kwargs: Any,
) -> Path:
    """A real PEFT LoRA adapter on ``base`` whose every adapter parameter is random (seeded) and non-zero.

    PEFT initialises lora_B (and lora_embedding_A) to zero, which would make every merge a no-op; we overwrite
    all LoRA factors and lora_B biases with ``scale * N(0, 1)``. DoRA magnitudes start equal to the weight norm,
    so they are multiplied by a random factor in [0.5, 1.5] to make them matter. A modules_to_save copy gets
    fresh random values so that replacing the base module is visible.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                if magnitude_jitter:
                    param.mul_(0.5 + torch.rand(param.shape, generator=gen))
                touched += 1
            elif "lora_" in name or "modules_to_save" in name:
                param.copy_(scale * torch.randn(param.shape, generator=gen))
                touched += 1
    assert touched, f"no LoRA parameters found for {lora_kwargs}"
    peft_model.save_pretrained(path, save_embedding_layers=save_embedding_layers)
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Reading


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a model or adapter folder: single file, or sharded with a ``*.safetensors.index.json``."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        assert len(indexes) == 1, f"several indexes in {folder}: {indexes}"
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
        out: dict[str, torch.Tensor] = {}
        for name in files:
            part = load_file(folder / name)
            assert all(weight_map[k] == name for k in part), f"{name} holds tensors its index puts elsewhere"
            out.update(part)
        assert set(out) == set(weight_map), f"index and shards disagree in {folder}"
        return out
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, f"expected exactly one .safetensors file in {folder}, found {files}"
    return load_file(files[0])


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Shapes from the headers only (cheap)."""
    shapes = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for k in f.keys():
                shapes[k] = tuple(f.get_slice(k).get_shape())
    return shapes


def adapter_config(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


def peft_merged_state_dict(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The reference: PEFT's own ``merge_and_unload`` on the base loaded by transformers, in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


# ----------------------------------------------------------------------------------------------------------
# Recipes and the CLI


def write_recipe(folder: Path, recipe: dict[str, Any] | str, name: str = "recipe.yaml") -> Path:
    """Write a recipe (a dict dumped as YAML, or raw text for malformed cases) and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    text = recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False)
    path.write_text(text)
    return path


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        """The non-empty lines of stderr."""
        return [line for line in self.err.splitlines() if line.strip()]

    def __str__(self) -> str:  # readable in assertion messages
        return f"exit {self.code}\n--- stdout ---\n{self.out}\n--- stderr ---\n{self.err}"


def run_cli(args: list[str], capfd) -> CliResult:
    """Run ``loracook.cli.main(args)`` in-process; ``capfd`` is pytest's fixture (fd-level capture)."""
    from loracook.cli import main

    capfd.readouterr()  # drop whatever earlier code printed
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # tolerated: a CLI framework may exit instead of returning
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capfd.readouterr()
    return CliResult(code if code is not None else 0, captured.out, captured.err)


def run_cli_subprocess(args: list[str], cwd: Path | None = None, timeout: float = 300) -> CliResult:
    """Run ``python -m loracook ARGS`` in a fresh interpreter (what a user's shell sees)."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "loracook", *[str(a) for a in args]],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


def ties_reference(deltas, weights, densities) -> torch.Tensor:
    """TIES written independently in numpy (docs/merge-methods.md): trim each delta to its top-k |value|
    (k = round(density·n), the lower flat index wins ties), elect the sign of Σ w_i δ_i, and average the
    w_i δ_i that agree with it (0 where none does)."""
    import numpy as np

    trimmed = []
    for d, p in zip(deltas, densities, strict=True):
        flat = d.numpy().astype(np.float64).ravel()
        k = min(flat.size, int(np.floor(p * flat.size + 0.5)))
        order = sorted(range(flat.size), key=lambda i: (-abs(flat[i]), i))
        keep = np.zeros(flat.size, dtype=bool)
        keep[order[:k]] = True
        trimmed.append(np.where(keep, flat, 0.0))
    weighted = np.stack([w * t for w, t in zip(weights, trimmed, strict=True)])
    sign = np.sign(weighted.sum(axis=0))
    agree = (np.sign(weighted) == sign) & (sign != 0)
    merged = np.where(agree, weighted, 0.0).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)
    return torch.from_numpy(merged.reshape(deltas[0].shape)).float()
