"""The merge-method registry: one module per method (or family), one line per method in ``BUILTIN``.

The recipe's `merge:` union, the JSON schema, the method list in error messages, the planner's rank rules and
the executor's dispatch are all read from here. Adding a method (docs/merge-methods.md, "Adding a merge
method"): write a module with its parameter class and a :class:`MergeMethod` subclass, add it to ``BUILTIN``,
run `loracook schema`.

>>> get("ties").elementwise, get("linear").exact
(True, True)
>>> "svd" in names()
True
"""

from __future__ import annotations

from loracook.methods.base import DenseInputs, Factors, MergeMethod
from loracook.methods.breadcrumbs import Breadcrumbs, BreadcrumbsTies
from loracook.methods.cat import Cat
from loracook.methods.core_space import CoreSpace
from loracook.methods.della import Della, DellaLinear
from loracook.methods.knots import Knots
from loracook.methods.linear import Linear, TaskArithmetic
from loracook.methods.sparsify import DareLinear, DareTies, MagnitudePrune, Ties
from loracook.methods.svd import Svd
from loracook.methods.tsv import Tsv

BUILTIN: tuple[type[MergeMethod], ...] = (
    Linear,
    TaskArithmetic,
    Cat,
    Svd,
    Ties,
    DareLinear,
    DareTies,
    MagnitudePrune,
    Breadcrumbs,
    BreadcrumbsTies,
    Della,
    DellaLinear,
    Knots,
    CoreSpace,
    Tsv,
)

_REGISTRY: dict[str, MergeMethod] = {cls.name: cls() for cls in BUILTIN}
_listeners: list = []


def register(method: MergeMethod) -> MergeMethod:
    """Add a method (a plugin, or a test's toy method); the recipe model is rebuilt to accept it."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    _REGISTRY[method.name] = method
    for listener in _listeners:
        listener()
    return method


def unregister(name: str) -> None:
    del _REGISTRY[name]
    for listener in _listeners:
        listener()


def on_change(listener) -> None:
    """Call ``listener`` whenever the registry changes (the recipe model rebuilds its union)."""
    _listeners.append(listener)


def get(name: str) -> MergeMethod:
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def param_classes() -> tuple[type, ...]:
    return tuple(m.params for m in _REGISTRY.values())


def method_of(params) -> MergeMethod:
    """The registered method of a validated `merge:` section."""
    return _REGISTRY[params.method]


__all__ = ["BUILTIN", "DenseInputs", "Factors", "MergeMethod", "get", "method_of", "names", "register"]
