"""The routing rules, as pure functions on tensors (no model, no files).

* ``centroid``: the mean embedding of each source's exemplars (after removing the mean over sources), and a
  prompt's weights softmax(cos(x − center, c_i) / T), optionally over the top-k sources only.
* ``gate``: the Dynamic Weight Ensembling gate, a 2-layer MLP (standardised embedding → hidden → n logits)
  trained with cross-entropy to predict which source an exemplar belongs to; weights softmax(logits / T),
  optionally top-k. Seeded, full-batch AdamW, a few hundred steps: seconds on a CPU.
* ``arrow``: PEFT's Arrow rule, training-free, per token and per adapted module: the prototype of source i at
  a module is the top right singular vector of its ΔW_i = B_i A_i (computed from the factors: QR of B and Aᵀ
  and the SVD of an r × r core, never forming ΔW); a token's input x gets the scores |x · p_i|, the top-k
  are kept and softmax(score / T) gives the weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from loracook.ops.factored import factored_svd

__all__ = [
    "arrow_prototypes",
    "arrow_weights",
    "centroid_scores",
    "fit_centroid",
    "fit_gate",
    "gate_scores",
    "top_k_softmax",
]

GATE_HIDDEN = 64
GATE_STEPS = 300
GATE_LR = 1e-2
GATE_WEIGHT_DECAY = 1e-2


def top_k_softmax(
    scores: Tensor, top_k: int | None, temperature: float, present: Tensor | None = None
) -> Tensor:
    """softmax(scores / T) over the k largest scores of the last dimension (the others get weight 0).

    ``present`` ([n] bool) excludes sources that have nothing at this place (Arrow: a module that a source
    does not adapt); k is then at most the number present, and a row with no source present is all zeros.
    """
    n = scores.shape[-1]
    if present is not None:
        scores = scores.masked_fill(~present, float("-inf"))
        available = int(present.sum())
    else:
        available = n
    if available == 0:
        return torch.zeros_like(scores)
    k = min(top_k or n, available)
    if k < n:
        values, index = torch.topk(scores, k, dim=-1)
        scores = torch.full_like(scores, float("-inf")).scatter(-1, index, values)
    return torch.softmax(scores / temperature, dim=-1)


# ------------------------------------------------------------------------------------------------ centroid


def fit_centroid(embeddings: Sequence[Tensor]) -> dict[str, Tensor]:
    """``center`` [d] (the mean of the sources' means) and ``centroids`` [n, d] (each source's mean minus it).

    Hidden states share large constant directions; removing the center makes the cosines tell sources apart.
    """
    means = torch.stack([e.to(torch.float64).mean(dim=0) for e in embeddings])
    center = means.mean(dim=0)
    return {"center": center.to(torch.float32), "centroids": (means - center).to(torch.float32)}


def centroid_scores(x: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
    """cos(x − center, centroid_i) for each row of x: [batch, n]."""
    shifted = x.to(torch.float32) - tensors["center"]
    return nn.functional.cosine_similarity(shifted.unsqueeze(1), tensors["centroids"].unsqueeze(0), dim=-1)


# ---------------------------------------------------------------------------------------------------- gate


def fit_gate(
    embeddings: Sequence[Tensor], seed: int, *, hidden: int = GATE_HIDDEN, steps: int = GATE_STEPS
) -> dict[str, Tensor]:
    """Train the 2-layer gate on exemplar embeddings (one tensor [m_i, d] per source); returns its tensors.

    Inputs are standardised per dimension (mean and std over every exemplar), classes are weighted by
    1 / count so that a source with more exemplars is not favoured, and the initialisation uses its own
    seeded generator (the global RNG is untouched): the same exemplars and seed give the same gate.
    """
    x = torch.cat([e.to(torch.float32) for e in embeddings])
    y = torch.cat([torch.full((len(e),), i, dtype=torch.long) for i, e in enumerate(embeddings)])
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp(min=1e-6)
    z = (x - mean) / std
    n, d = len(embeddings), x.shape[1]
    gen = torch.Generator().manual_seed(int(seed))
    w1 = (torch.randn(hidden, d, generator=gen) / math.sqrt(d)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(n, hidden, generator=gen) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(n, requires_grad=True)
    counts = torch.bincount(y, minlength=n).to(torch.float32)
    class_weight = counts.sum() / (n * counts.clamp(min=1.0))
    optimizer = torch.optim.AdamW([w1, b1, w2, b2], lr=GATE_LR, weight_decay=GATE_WEIGHT_DECAY)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = nn.functional.linear(torch.relu(nn.functional.linear(z, w1, b1)), w2, b2)
            loss = nn.functional.cross_entropy(logits, y, weight=class_weight)
            loss.backward()
            optimizer.step()
    tensors = {"mean": mean, "std": std, "w1": w1, "b1": b1, "w2": w2, "b2": b2}
    return {k: v.detach().clone() for k, v in tensors.items()}


def gate_scores(x: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
    """The gate's logits for each row of x: [batch, n]."""
    z = (x.to(torch.float32) - tensors["mean"]) / tensors["std"]
    hidden = torch.relu(nn.functional.linear(z, tensors["w1"], tensors["b1"]))
    return nn.functional.linear(hidden, tensors["w2"], tensors["b2"])


def gate_accuracy(embeddings: Sequence[Tensor], tensors: Mapping[str, Tensor]) -> float:
    """Share of the exemplars the trained gate assigns to their own source (training accuracy)."""
    x = torch.cat(list(embeddings))
    y = torch.cat([torch.full((len(e),), i) for i, e in enumerate(embeddings)])
    return float((gate_scores(x, tensors).argmax(dim=-1) == y).to(torch.float32).mean())


# --------------------------------------------------------------------------------------------------- arrow


def top_right_singular_vector(b: Tensor, a: Tensor) -> Tensor:
    """The top right singular vector of B @ A (in-space, unit norm) from the factors, in float64.

    The sign of a singular vector is arbitrary; it is fixed here (largest entry positive) only so that the
    artifact is reproducible, since Arrow scores |x · p|.
    """
    _, _, vh = factored_svd(b.to(torch.float64), a.to(torch.float64))
    v = vh[0]
    return v if v[v.abs().argmax()] >= 0 else -v


def arrow_prototypes(
    sources: Sequence[Mapping[str, tuple[Tensor, Tensor]]],
) -> dict[str, tuple[Tensor, Tensor]]:
    """Per module: prototypes [n, in] (a zero row where a source does not adapt the module) and present [n].

    ``sources`` holds, per source, {module: (B, A)}.
    """
    modules = sorted({m for source in sources for m in source})
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for module in modules:
        dims = {a.shape[1] for source in sources if module in source for _, a in [source[module]]}
        (in_features,) = dims
        protos = torch.zeros(len(sources), in_features, dtype=torch.float32)
        present = torch.zeros(len(sources), dtype=torch.bool)
        for i, source in enumerate(sources):
            if module in source:
                b, a = source[module]
                protos[i] = top_right_singular_vector(b, a).to(torch.float32)
                present[i] = True
        out[module] = (protos, present)
    return out


def arrow_weights(
    x: Tensor, prototypes: Tensor, present: Tensor, top_k: int | None, temperature: float
) -> Tensor:
    """Arrow's per-token weights for a module's input x [..., in]: [..., n]."""
    scores = torch.abs(x @ prototypes.t().to(x.dtype))
    return top_k_softmax(scores, top_k, temperature, present)
