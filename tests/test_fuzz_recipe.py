"""Property-based fuzz of the recipe loader (issue 16): whatever the text, ``load_recipe_text`` returns a recipe
or raises BadInput with one line; never another exception, never slowly, never with much memory.

Four generators, in-process for speed: YAML-flavoured noise, arbitrary Unicode, recipe-shaped data dumped as
YAML (with shared sub-objects, so aliases appear), and random edits of a valid recipe. The time bound is
hypothesis' deadline per example; the memory bound is measured on the worst inputs the bounded loader knows.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loracook.errors import BadInput
from loracook.recipe import load_recipe_text

FUZZ = settings(
    max_examples=100,
    deadline=3000,  # ms per example: generous for a loaded 2-core machine; a hang or a bomb takes far longer
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
RECIPE_FILE = Path("/nonexistent-fuzz-folder/recipe.yaml")  # relative paths resolve under it; nothing is read

VALID = """\
loracook: 1
name: fuzz
base: ./base
sources:
  a: ./ad
  b: {adapter: ./ad2, dare: {drop: 0.1, seed: 1}}
merge:
  method: ties
  density: 0.5
  rank: 4
  weights:
    a: [0.0, 1.0]
    b: [{filter: "layers\\\\.1\\\\.", value: 0.5}, {value: 1.0}]
output: {kind: adapter, path: ./out, dtype: float32, shard_size: 1GB}
"""


def loads_cleanly(text: str) -> None:
    """The property: a recipe, or one clean line of BadInput."""
    try:
        load_recipe_text(text, RECIPE_FILE)
    except BadInput as error:
        line = error.one_line()
        assert line and "\n" not in line and "Traceback" not in line


# ---------------------------------------------------------------------------------------------- strategies

YAML_CHARS = list("abcxyz019.:-[]{},&*!|>#'\"\n ?<%@`\t\\/=+_~^$()") + [
    "<<",
    "- ",
    ": ",
    "\n  ",
    "!!",
    "&a",
    "*a",
]
KEYS = [
    "loracook", "name", "base", "sources", "merge", "output", "evaluate", "search", "method", "weights",
    "density", "rank", "seed", "majority_sign", "rescale", "path", "kind", "dtype", "shard_size", "adapter",
    "dare", "drop", "extract", "model", "include", "exclude", "energy", "filter", "value", "tasks", "limit",
    "baselines", "revision", "gguf_file", "a", "b", "<<",
]  # fmt: skip
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(
        ["linear", "ties", "svd", "cat", "model", "adapter", "float32", "2GB", "./ad", "", "(", "a+"]
    ),
    st.text(max_size=20),
)


def _containers(children):
    return st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.sampled_from(KEYS), children, max_size=4)
    )


VALUES = st.recursive(SCALARS, _containers, max_leaves=25)


@st.composite
def recipe_shaped(draw) -> str:
    """A dict with recipe keys and random values, some sub-objects shared (YAML aliases when dumped)."""
    data = draw(st.dictionaries(st.sampled_from(KEYS[:8]), VALUES, max_size=7))
    if draw(st.booleans()):
        data["loracook"] = draw(st.sampled_from([1, 1, 2, "1", True, None, 1.0]))
    shared = draw(VALUES)
    for key in draw(st.lists(st.sampled_from(KEYS[:8]), max_size=3)):
        data[key] = shared
    return yaml.dump(data, sort_keys=False, allow_unicode=draw(st.booleans()))


@st.composite
def edited_recipe(draw) -> str:
    """The valid recipe with a few random insertions, deletions and line duplications."""
    text = VALID
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(text)))
        action = draw(st.sampled_from(["insert", "delete", "duplicate"]))
        if action == "insert":
            text = text[:at] + draw(st.sampled_from(YAML_CHARS)) + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 10)) :]
        else:
            lines = text.splitlines(keepends=True)
            index = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: index + 1] + [lines[index]] + lines[index + 1 :])
    return text


# ---------------------------------------------------------------------------------------------------- tests


def test_the_valid_recipe_loads():
    loaded = load_recipe_text(VALID, RECIPE_FILE)
    assert loaded.recipe.merge.method == "ties"


@FUZZ
@given(st.lists(st.sampled_from(YAML_CHARS), max_size=120).map("".join))
def test_yaml_noise(text):
    loads_cleanly(text)


@FUZZ
@given(st.text(max_size=200))
def test_any_unicode(text):
    loads_cleanly(text)


@FUZZ
@given(recipe_shaped())
def test_recipe_shaped_data(text):
    loads_cleanly(text)


@FUZZ
@given(edited_recipe())
def test_edited_valid_recipe(text):
    loads_cleanly(text)


def _bomb(levels: int) -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"{chr(97 + i)}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 9) + "]")
    return "\n".join(lines) + "\nloracook: 1\n"


WORST = {
    "alias_bomb": _bomb(9),
    "wide_alias_fanout": "a: &a [" + ",".join(["1"] * 400) + "]\nb: [" + ",".join(["*a"] * 100) + "]\n",
    "deep_flow": "loracook: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep_block": "".join("  " * i + f"k{i}:\n" for i in range(1500)),
    "long_line": "loracook: 1\nname: " + "x" * 900_000 + "\n",
    "many_keys": "".join(f"k{i}: {i}\n" for i in range(30_000)),
}


@pytest.mark.parametrize("name", sorted(WORST))
def test_worst_inputs_stay_within_bounds(name):
    """Each refused (or loaded) within 10 s and 200 MB of Python allocations, on a loaded 2-core machine."""
    import time

    text = WORST[name]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        loads_cleanly(text)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert elapsed < 10 and peak < 200 * 2**20, (name, elapsed, math.ceil(peak / 2**20))
