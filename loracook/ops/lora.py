"""LoRA deltas as PEFT defines them, for a block of rows of the stored weight."""

from __future__ import annotations

import torch


def lora_rows(a: torch.Tensor, b: torch.Tensor, transposed: bool, rows: tuple[int, int]) -> torch.Tensor:
    """Rows ``rows`` of ΔW = B @ A, or of (B @ A)ᵀ when the weight is stored transposed (Conv1D, embeddings).

    ``b`` carries the scale and weight already. Only the requested rows are formed.

    >>> a, b = torch.ones(2, 3), torch.ones(4, 2)
    >>> lora_rows(a, b, False, (0, 1)).shape, lora_rows(a, b, True, (0, 1)).shape
    (torch.Size([1, 3]), torch.Size([1, 4]))
    """
    start, stop = rows
    if transposed:
        return a[:, start:stop].T @ b.T
    return b[start:stop] @ a


def dora_delta(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, transposed: bool
) -> torch.Tensor:
    """DoRA's merged weight minus the base: m / ‖W + ΔW‖ ⊙ (W + ΔW) − W, norms over each output row.

    ``weight`` and ``delta`` are stored as the base stores them; with ``transposed`` an output row is a column.
    """
    merged = weight + delta
    dim = 0 if transposed else 1
    norm = torch.linalg.vector_norm(merged, dim=dim, keepdim=True)
    factor = magnitude.reshape(norm.shape) / norm
    return factor * merged - weight
