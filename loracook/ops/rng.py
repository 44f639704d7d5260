"""Reproducible per-tensor random generators.

DARE masks must not depend on the order in which tensors are processed, on the process or on Python's
salted ``hash()``, so each tensor gets its own CPU generator seeded from sha256(seed, tensor name).
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["tensor_generator", "tensor_seed"]


def tensor_seed(seed: int, name: str) -> int:
    """The 63-bit seed of tensor ``name`` under the global ``seed`` (first 8 bytes of a sha256, masked).

    >>> tensor_seed(0, "model.layers.0.mlp.up_proj") == tensor_seed(0, "model.layers.0.mlp.up_proj")
    True
    >>> tensor_seed(0, "a") != tensor_seed(1, "a")
    True
    """
    # seed is an int, so "seed:name" cannot collide for different (seed, name) pairs.
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """A fresh CPU generator for tensor ``name``: same (seed, name), same stream, in any process.

    The stream is that of torch's CPU Mersenne twister, so masks drawn from it are identical across runs and
    machines for a given torch version (torch does not promise identical streams across versions).

    >>> g1, g2 = tensor_generator(0, "q_proj"), tensor_generator(0, "q_proj")
    >>> bool(torch.equal(torch.rand(4, generator=g1), torch.rand(4, generator=g2)))
    True
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(tensor_seed(seed, name))
    return generator
