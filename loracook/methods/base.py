"""What a merge method is: its recipe parameters, its traits, and how it combines per-source updates.

A method combines the updates ΔW_i of one module, weighted by w_i. It may do so in two ways:

- ``dense``: from each whole ΔW_i in fp32 (every method has this; element-wise methods have only this);
- ``factored``: from the LoRA factors (w_i, s_i·B_i, A_i) alone, without forming the d×k deltas, for methods
  whose result is low-rank by construction (linear, cat, svd, and the LoRA-native methods).

The planner reads the traits (``exact``, ``elementwise``, ``truncates``) to pick ranks and the executor's path;
nothing outside a method's module tests its name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

from loracook.recipe.types import MergeParams

if TYPE_CHECKING:  # torch is imported where the math runs, so that `validate` and `--help` stay light
    import torch
    from torch import Tensor

Pair = tuple[float, Any, Any]  # (w_i, s_i · B_i, A_i), fp32 tensors


class Factors(NamedTuple):
    """A merged module in factored form: ΔW ≈ B @ A, with the Frobenius error against the method's exact
    target (0 when exact) and that target's norm."""

    B: Any  # Tensor
    A: Any  # Tensor
    err: float
    total: float
    how: str  # exact | factored-svd | … (reported per module in merge_report.json)


@dataclass(frozen=True)
class DenseInputs:
    """Run-time inputs of a dense combine besides the deltas: one density and one RNG name per source."""

    weights: Sequence[float]
    densities: Sequence[float]
    names: Sequence[str]  # "<tensor>|<source>": seeds each source's random mask reproducibly
    seed: int = 0
    sources: Sequence[str] = ()  # the source of each term, in order


class MergeMethod:
    """Base class of merge methods. A subclass sets the class attributes and overrides ``dense`` (and
    ``factored`` when the method works from the factors); one instance is registered per method name."""

    name: ClassVar[str]
    params: ClassVar[type[MergeParams]]  # the recipe's `merge:` section for this method
    reference_url: ClassVar[str] = ""
    exact: ClassVar[bool] = False  # the result is Σ w_i ΔW_i exactly (rank Σ r_i, factors stacked)
    elementwise: ClassVar[bool] = False  # needs each ΔW_i whole: an adapter output recompresses to merge.rank
    truncates: ClassVar[bool] = False  # the result is a best rank-`merge.rank` approximation
    factored_form: ClassVar[bool] = False  # ``factored`` is implemented
    dense_form: ClassVar[bool] = True  # ``dense`` is implemented (else only plain LoRA sources apply)
    density: ClassVar[bool] = False  # takes `merge.density` (bound per source at run time)

    def dense(self, deltas: Sequence[Tensor], inputs: DenseInputs, params: MergeParams) -> Tensor:
        """Combine whole fp32 deltas of one tensor."""
        raise NotImplementedError(f"{self.name} has no dense form")

    def factored(self, pairs: Sequence[Pair], rank: int, params: MergeParams, inputs: DenseInputs) -> Factors:
        """Combine the factors of one module into factors of rank ≤ ``rank`` (``inputs``: the bound
        densities and RNG names, for methods that merge element-wise in an aligned space)."""
        raise NotImplementedError(f"{self.name} has no factored form")

    # ------------------------------------------------------------------------------------------ planning

    def check_terms(self, params: MergeParams, terms: Sequence[Any]) -> str | None:
        """A problem with one module's terms (plan terms: ``source``, ``a``, ``b``), or None. Called by the
        planner for every module, so a bad option fails before any tensor is read."""
        return None

    def rank_of(self, params: MergeParams) -> int | None:
        return getattr(params, "rank", None)

    def output_rank(self, params: MergeParams, total: int, full_rank: int, dense_terms: bool) -> int:
        """The rank of an adapter output module whose sources have total rank ``total``.

        ``dense_terms``: some source is pre-processed element-wise (per-source DARE), so the factored form
        does not apply and the result is recompressed to merge.rank like an element-wise method's."""
        rank = self.rank_of(params)
        if dense_terms or not self.factored_form:
            assert rank is not None, "checked by the planner"
            return min(rank, full_rank)
        if self.exact:
            return min(rank or total, total)
        return min(rank or total, total, full_rank)

    def describe(self, params: MergeParams) -> str:
        return self.name


def stacked(pairs: Sequence[Pair]) -> tuple[Tensor, Tensor]:
    """[w_1 B_1 | … | w_n B_n] and [A_1; …; A_n]: the exact factors of Σ w_i ΔW_i."""
    from loracook.ops.factored import stack_factors

    return stack_factors(pairs)


def truncated(B: Tensor, A: Tensor, rank: int) -> Factors:
    """The best rank-``rank`` approximation of B @ A, from the factors (QR + SVD of a small core)."""
    from loracook.ops.factored import truncate_factors

    b, a, err, total = truncate_factors(B, A, rank)
    return Factors(b, a, float(err), float(total), "factored-svd")


def weighted_sum(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    from loracook.ops.sparsify import task_arithmetic

    return task_arithmetic(list(deltas), list(weights))


def generators(inputs: DenseInputs) -> list[torch.Generator]:
    from loracook.ops.rng import tensor_generator

    return [tensor_generator(inputs.seed, name) for name in inputs.names]
