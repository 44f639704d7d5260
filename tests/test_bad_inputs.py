"""Bad input: exit code 2, one line on stderr naming the file, no traceback, and nothing left on disk.

Each case builds its broken world in ``tmp_path`` and returns the CLI arguments after the verb. The phrases are
loose, case-insensitive substrings (the exact wording is the engine's business); the file names are what a
user needs to find the problem.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import LLAMA_LINEAR, read_tensors, run_cli, run_cli_subprocess, write_recipe
from safetensors.torch import save_file

# ------------------------------------------------------------------------------------------------- helpers


def good_recipe(zoo, folder: Path, adapter: str = "a") -> dict:
    """A recipe that works; each case breaks one thing in it."""
    return {
        "loracook": 1,
        "base": os.path.relpath(zoo.models["llama"], folder),
        "sources": {"a": os.path.relpath(zoo.adapters[adapter], folder)},
        "merge": {"method": "linear", "weights": {"a": 1.0}},
        "output": {"kind": "model", "path": "./out", "dtype": "float32"},
    }


def copy_adapter(zoo, folder: Path, name: str = "a") -> Path:
    return Path(shutil.copytree(zoo.adapters[name], folder))


def snapshot(root: Path) -> dict[str, str | None]:
    """Every path under root with a hash of its content: detects created, removed and changed files."""
    return {
        str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


class _Evil:
    """Unpickling this runs a shell command (creates ``marker``): a weights-only loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@dataclass(frozen=True)
class Bad:
    build: Callable[..., list[str]]  # (zoo, tmp_path) -> paths after the verb
    files: tuple[str, ...]  # substrings of file names that the message must contain, all of them
    says: tuple[str | tuple[str, ...], ...]  # phrase groups: each group must match (any alternative)
    static: bool = True  # `validate` and `plan` must catch it too (schema, semantics, headers)
    verbs: tuple[str, ...] | None = None  # override: the only verbs that apply


CASES: dict[str, Bad] = {}


def case(*, files=("recipe.yaml",), says=(), static=True, verbs=None, name=None):
    def register(fn):
        CASES[name or fn.__name__] = Bad(fn, tuple(files), tuple(says), static, verbs)
        return fn

    return register


def recipe_with(zoo, tmp: Path, change: Callable[[dict], None]) -> list[str]:
    recipe = good_recipe(zoo, tmp)
    change(recipe)
    return [str(write_recipe(tmp, recipe))]


# ---------------------------------------------------------------------------------- the recipe file itself


@case(files=("no_such_recipe.yaml",), says=(("not found", "no such", "does not exist", "missing"),))
def recipe_missing(zoo, tmp):
    return [str(tmp / "no_such_recipe.yaml")]


@case(says=(("yaml", "syntax", "parse", "line"),))
def malformed_yaml(zoo, tmp):
    text = "loracook: 1\nbase: [unclosed\nsources:\n  a: ./x\n"
    return [str(write_recipe(tmp, text))]


@case(says=(("yaml", "mapping", "empty"),))
def recipe_empty(zoo, tmp):
    return [str(write_recipe(tmp, ""))]


@case(says=(("mapping", "yaml", "dict", "object"),))
def recipe_not_a_mapping(zoo, tmp):
    return [str(write_recipe(tmp, "- loracook\n- 1\n"))]


@case(says=("bogus", ("unknown", "not allowed", "not permitted", "extra")))
def unknown_top_level_key(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.update(bogus=1))


@case(says=("wieghts", "did you mean", "weights"))
def unknown_nested_key(zoo, tmp):
    def change(r):
        r["merge"]["wieghts"] = r["merge"].pop("weights")

    return recipe_with(zoo, tmp, change)


@case(says=("rank",))
def wrong_type_rank(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["merge"].update(rank="abc"))


@case(says=("weight", ("number", "float", "valid", "list")))
def wrong_type_weight(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["merge"].update(weights={"a": "high"}))


@case(says=("loracook",))
def missing_version(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.pop("loracook"))


@case(says=("loracook", ("version", "1", "unsupported")))
def unsupported_version(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.update(loracook=2))


@case(says=("sources",))
def empty_sources(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.update(sources={}))


@case(says=(("adapter", "extract"),))
def source_both_adapter_and_extract(zoo, tmp):
    both = {"adapter": str(zoo.adapters["a"]), "extract": {"model": str(zoo.models["llama"]), "rank": 4}}
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a=both))


@case(says=("frobnicate", "method"))
def unknown_merge_method(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["merge"].update(method="frobnicate"))


@case(says=("zz", ("unknown", "source")))
def weight_for_unknown_source(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["merge"]["weights"].update(zz=0.5))


@case(says=("layer",))
def per_layer_list_longer_than_layers(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["merge"].update(weights={"a": [0.0, 0.25, 0.5, 0.75, 1.0]}))


@case(says=("mlp(", ("regex", "compile", "pattern")))
def filter_regex_does_not_compile(zoo, tmp):
    rules = [{"filter": "mlp(", "value": 0.5}, {"value": 1.0}]
    return recipe_with(zoo, tmp, lambda r: r["merge"].update(weights={"a": rules}))


@case(says=(("drop", "dare"),))
def dare_drop_out_of_range(zoo, tmp):
    source = {"adapter": str(zoo.adapters["a"]), "dare": {"drop": 1.5}}
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a=source))


@case(says=("shard",))
def shard_size_negative(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["output"].update(shard_size=-5))


@case(says=("shard",))
def shard_size_zero(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["output"].update(shard_size="0GB"))


@case(says=("shard", ("2xb", "size")))
def shard_size_unparsable(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["output"].update(shard_size="2XB"))


@case(says=("dtype",))
def unknown_output_dtype(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["output"].update(dtype="float13"))


@case(says=("kind",))
def invalid_output_kind(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["output"].update(kind="gguf"))


@case(says=("hellaswag",))
def evaluate_hub_task_offline(zoo, tmp):
    """A built-in lm-eval task needs its hub dataset, which is not cached here: refused before merging."""
    return recipe_with(zoo, tmp, lambda r: r.update(evaluate={"tasks": ["hellaswag"], "limit": 10}))


@case(says=("search.objective",))
def search_section(zoo, tmp):
    """`search:` is supported now; its examples live under `search.objective` (the format of DESIGN.md)."""
    (tmp / "fewshot.jsonl").write_text('{"input": "a", "output": "b"}\n')
    return recipe_with(zoo, tmp, lambda r: r.update(search={"examples": "./fewshot.jsonl", "budget": 5}))


@case(says=("duplicate", "merge"))
def duplicate_yaml_key(zoo, tmp):
    """PyYAML keeps the last of two equal keys; half the recipe would be silently dropped."""
    text = yaml.safe_dump(good_recipe(zoo, tmp), sort_keys=False)
    return [str(write_recipe(tmp, text + "merge:\n  method: linear\n  weights: {a: 0.1}\n"))]


@case(says=(("nan", "finite", "number"),))
def weight_nan(zoo, tmp):
    text = yaml.safe_dump(good_recipe(zoo, tmp), sort_keys=False).replace("a: 1.0", "a: .nan")
    return [str(write_recipe(tmp, text))]


@case(says=(("inf", "finite", "number"),))
def weight_infinite(zoo, tmp):
    text = yaml.safe_dump(good_recipe(zoo, tmp), sort_keys=False).replace("a: 1.0", "a: -.inf")
    return [str(write_recipe(tmp, text))]


@case(says=(("name", "pattern", "source", "match"),))
def source_name_with_space(zoo, tmp):
    def change(r):
        r["sources"] = {"my source": r["sources"]["a"]}
        r["merge"]["weights"] = {"my source": 1.0}

    return recipe_with(zoo, tmp, change)


@case(files=("d.yaml",), says=())
def recipe_is_a_directory(zoo, tmp):
    (tmp / "d.yaml").mkdir()
    return [str(tmp / "d.yaml")]


@case(files=(), says=("seed",), verbs=("run",))
def cli_seed_not_an_int(zoo, tmp):
    return [str(write_recipe(tmp, good_recipe(zoo, tmp))), "--seed", "abc"]


@case(files=(), says=("--frobnicate",), verbs=("run",))
def cli_unknown_option(zoo, tmp):
    return [str(write_recipe(tmp, good_recipe(zoo, tmp))), "--frobnicate"]


@case(files=("bad.yaml",), says=(), verbs=("validate",))
def validate_several_one_bad(zoo, tmp):
    good1 = write_recipe(tmp, good_recipe(zoo, tmp), "good1.yaml")
    broken = good_recipe(zoo, tmp)
    broken["merge"]["method"] = "frobnicate"
    bad = write_recipe(tmp, broken, "bad.yaml")
    good2 = write_recipe(tmp, good_recipe(zoo, tmp), "good2.yaml")
    return [str(good1), str(bad), str(good2)]


# ------------------------------------------------------------------------------------ base model files


@case(files=("no_such_base",), says=(("not found", "no such", "does not exist", "exist", "missing"),))
def missing_base_folder(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.update(base="./no_such_base"))


@case(files=("empty_base",), says=(("safetensors", "model", "weights", "no "),))
def base_folder_without_weights(zoo, tmp):
    (tmp / "empty_base").mkdir()
    (tmp / "empty_base" / "config.json").write_bytes((zoo.models["llama"] / "config.json").read_bytes())
    return recipe_with(zoo, tmp, lambda r: r.update(base="./empty_base"))


@case(files=("model.safetensors",), says=())
def truncated_base_safetensors(zoo, tmp):
    base = Path(shutil.copytree(zoo.models["llama"], tmp / "base_cut"))
    data = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(data[: len(data) // 2])
    return recipe_with(zoo, tmp, lambda r: r.update(base="./base_cut"))


@case(files=("model.safetensors",), says=(("header", "safetensors", "corrupt", "invalid"),))
def garbage_safetensors_header(zoo, tmp):
    base = Path(shutil.copytree(zoo.models["llama"], tmp / "base_garbage"))
    garbage = b"{this is not json at all" + b"\x00\xff" * 20
    (base / "model.safetensors").write_bytes(len(garbage).to_bytes(8, "little") + garbage + b"\x00" * 64)
    return recipe_with(zoo, tmp, lambda r: r.update(base="./base_garbage"))


@case(files=("model-00002-of",), says=())
def truncated_shard_of_sharded_base(zoo, tmp):
    base = Path(shutil.copytree(zoo.models["llama_sharded"], tmp / "base_shards"))
    shard = sorted(base.glob("model-00002-of-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    return recipe_with(zoo, tmp, lambda r: r.update(base="./base_shards"))


@case(files=("model-00003-of",), says=(("missing", "not found", "no such"),))
def sharded_base_missing_shard(zoo, tmp):
    base = Path(shutil.copytree(zoo.models["llama_sharded"], tmp / "base_shards"))
    sorted(base.glob("model-00003-of-*.safetensors"))[0].unlink()
    return recipe_with(zoo, tmp, lambda r: r.update(base="./base_shards"))


@case(files=("model.safetensors.index.json",), says=())
def sharded_base_broken_index(zoo, tmp):
    base = Path(shutil.copytree(zoo.models["llama_sharded"], tmp / "base_shards"))
    (base / "model.safetensors.index.json").write_text("{not json")
    return recipe_with(zoo, tmp, lambda r: r.update(base="./base_shards"))


@case(files=("nonexistent-org/nonexistent-model",), says=(("offline", "not found", "cache", "local"),))
def base_hub_id_offline(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r.update(base="nonexistent-org/nonexistent-model"))


@case(files=("nope.gguf",), says=(("not found", "no such", "exist", "missing"),))
def base_gguf_file_missing(zoo, tmp):
    return recipe_with(
        zoo, tmp, lambda r: r.update(base={"path": str(zoo.models["llama"]), "gguf_file": "nope.gguf"})
    )


# ------------------------------------------------------------------------------------------ adapter files


@case(files=("no_such_adapter",), says=(("not found", "no such", "does not exist", "exist", "missing"),))
def missing_adapter_folder(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a={"adapter": "./no_such_adapter"}))


@case(files=("no_such_adapter",), says=(("not found", "no such", "does not exist", "exist", "missing"),))
def missing_adapter_folder_string_form(zoo, tmp):
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./no_such_adapter"))


@case(files=("adapter_config.json",), says=())
def adapter_without_config(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_noconfig")
    (folder / "adapter_config.json").unlink()
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_noconfig"))


@case(files=("adapter_config.json",), says=("json",))
def adapter_config_invalid_json(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_badjson")
    text = (folder / "adapter_config.json").read_text()
    (folder / "adapter_config.json").write_text(text[: len(text) // 2])
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_badjson"))


@case(files=("ad_loha",), says=(("lora", "peft_type", "loha"),))
def adapter_not_lora(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_loha")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["peft_type"] = "LOHA"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_loha"))


@case(files=("ad_noweights",), says=(("safetensors", "adapter_model", "weights", "no "),))
def adapter_without_weights(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_noweights")
    (folder / "adapter_model.safetensors").unlink()
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_noweights"))


@case(
    files=("ad_half",), says=("k_proj", ("lora_b", "missing", "without", "incomplete", "only one", "factor"))
)
def adapter_lora_a_without_lora_b(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_half")
    tensors = read_tensors(folder)
    tensors.pop("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
    save_file(tensors, folder / "adapter_model.safetensors")
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_half"))


@case(files=("adapter_wide",), says=("shape", tuple(LLAMA_LINEAR)))
def adapter_for_another_base(zoo, tmp):
    """Made on a hidden-48 llama: every factor's shape disagrees with the hidden-32 base."""
    return [str(write_recipe(tmp, good_recipe(zoo, tmp, adapter="wide")))]


@case(files=("adapter_deep",), says=("layers.2",))
def adapter_targets_module_base_lacks(zoo, tmp):
    """Made on a 3-layer llama: model.layers.2.* do not exist in the 2-layer base."""
    return [str(write_recipe(tmp, good_recipe(zoo, tmp, adapter="deep")))]


@case(files=("adapter_gpt2",), says=("c_attn",))
def adapter_for_another_architecture(zoo, tmp):
    return [str(write_recipe(tmp, good_recipe(zoo, tmp, adapter="gpt2")))]


@case(files=("adapter_bias",), says=("bias",))
def lora_bias_on_base_without_bias(zoo, tmp):
    """lora_bias merges into the base layer's bias; the plain llama has none (PEFT refuses to merge too)."""
    return [str(write_recipe(tmp, good_recipe(zoo, tmp, adapter="bias")))]


@case(files=("adapter_config.json",), says=(("object", "mapping", "dict"),))
def adapter_config_not_an_object(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_list")
    (folder / "adapter_config.json").write_text("[1, 2]")
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_list"))


@case(files=("adapter_config.json",), says=("rank",))
def adapter_config_rank_disagrees_with_tensors(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_rank")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["r"] = 4  # the factors have rank 8 and there is no rank_pattern
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_rank"))


def _init_case(init: str):
    """PiSSA/OLoRA-style inits rewrite the base weights: the adapter is relative to a base we do not have."""

    @case(files=("adapter_config.json",), says=(init,), name=f"adapter_init_{init}")
    def build(zoo, tmp):
        folder = copy_adapter(zoo, tmp / "ad_init")
        config = json.loads((folder / "adapter_config.json").read_text())
        config["init_lora_weights"] = init
        (folder / "adapter_config.json").write_text(json.dumps(config))
        return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_init"))


for _init in ("pissa", "olora"):
    _init_case(_init)


@case(files=("adapter_model.safetensors",), says=("dtype",))
def adapter_unknown_tensor_dtype(zoo, tmp):
    folder = copy_adapter(zoo, tmp / "ad_dtype")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    header = json.dumps({key: {"dtype": "Q9", "shape": [8, 32], "data_offsets": [0, 1024]}}).encode()
    (folder / "adapter_model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + bytes(1024)
    )
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_dtype"))


@case(files=("adapter_model.bin",), says=(("dict", "mapping", "tensors"),))
def bin_adapter_not_a_dict(zoo, tmp):
    folder = tmp / "ad_binlist"
    folder.mkdir()
    shutil.copy(zoo.adapters["a"] / "adapter_config.json", folder / "adapter_config.json")
    torch.save([torch.zeros(2)], folder / "adapter_model.bin")
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_binlist"))


def _nan_adapter(zoo, tmp: Path) -> Path:
    folder = copy_adapter(zoo, tmp / "ad_nan")
    tensors = read_tensors(folder)
    tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"][3, 2] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


@case(files=("ad_nan",), says=(("nan", "finite"),), static=False)
def adapter_with_nan(zoo, tmp):
    """Found only while merging (headers cannot tell): the half-written output must be cleaned up."""
    _nan_adapter(zoo, tmp)
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_nan"))


@case(files=("ad_nan",), says=(("nan", "finite"),), static=False, verbs=("run",))
def adapter_with_nan_and_force_keeps_old_output(zoo, tmp):
    """A failed --force run must leave the previous output as it was (replace only on success)."""
    _nan_adapter(zoo, tmp)
    (tmp / "out").mkdir()
    (tmp / "out" / "previous.txt").write_text("the last good output")
    return [*recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_nan")), "--force"]


def _pickle_adapter(zoo, tmp, name: str, write: Callable[[Path, dict], None]) -> list[str]:
    folder = tmp / name
    folder.mkdir()
    shutil.copy(zoo.adapters["a"] / "adapter_config.json", folder / "adapter_config.json")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    write(folder / "adapter_model.bin", {key: _Evil(tmp / "PWNED")})
    return recipe_with(zoo, tmp, lambda r: r["sources"].update(a=f"./{name}"))


UNPICKLE_WORDS = (
    "pickle",
    "weights_only",
    "weights-only",
    "unsafe",
    "safetensors",
    "refus",
    "cannot",
    "untrusted",
)


@case(files=("adapter_model.bin",), says=(UNPICKLE_WORDS,))
def pickled_bin_adapter_raw(zoo, tmp):
    def write(path, obj):
        path.write_bytes(pickle.dumps(obj))

    return _pickle_adapter(zoo, tmp, "ad_pickle", write)


@case(files=("adapter_model.bin",), says=(UNPICKLE_WORDS,))
def pickled_bin_adapter_torch_zip(zoo, tmp):
    return _pickle_adapter(zoo, tmp, "ad_torchsave", lambda path, obj: torch.save(obj, path))


# ------------------------------------------------------------------------------------------------ output


@case(files=("out",), says=(("exist", "force"),), static=False, verbs=("run",))
def output_exists_without_force(zoo, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "precious.txt").write_text("do not touch")
    return [str(write_recipe(tmp, good_recipe(zoo, tmp)))]


@case(files=("afile",), says=(), static=False, verbs=("run",))
def output_parent_is_a_file(zoo, tmp):
    (tmp / "afile").write_text("a file, not a folder")
    return recipe_with(zoo, tmp, lambda r: r["output"].update(path="./afile/out"))


@case(files=("base_copy",), says=(("input", "overlap", "base"),), static=False, verbs=("run",))
def output_is_the_base_folder_with_force(zoo, tmp):
    """--force must never delete an input."""
    shutil.copytree(zoo.models["llama"], tmp / "base_copy")
    return [
        *recipe_with(zoo, tmp, lambda r: r.update(base="./base_copy")),
        "--output",
        str(tmp / "base_copy"),
        "--force",
    ]


@case(files=("ad_copy",), says=(("input", "overlap", "adapter"),), static=False, verbs=("run",))
def output_is_an_adapter_folder_with_force(zoo, tmp):
    copy_adapter(zoo, tmp / "ad_copy")
    return [
        *recipe_with(zoo, tmp, lambda r: r["sources"].update(a="./ad_copy")),
        "--output",
        str(tmp / "ad_copy"),
        "--force",
    ]


# ------------------------------------------------------------------------------------------------- tests


def _argv(verb: str, bad: Bad, zoo, tmp: Path) -> list[str]:
    return [verb, *bad.build(zoo, tmp)]


def _check(res, bad: Bad, before: dict, tmp: Path, cwd: Path) -> None:
    assert res.code == 2, str(res)
    assert "Traceback" not in res.err and "Traceback" not in res.out, str(res)
    assert len(res.err_lines) == 1, f"stderr must be one line:\n{res}"
    message = res.err_lines[0]
    for name in bad.files:
        assert name in message, f"{name!r} not named in: {message}"
    low = message.lower()
    for group in bad.says:
        options = (group,) if isinstance(group, str) else group
        assert any(o.lower() in low for o in options), f"none of {options} in: {message}"
    # nothing written, nothing changed, no temp folder left beside the output, nothing in the cwd
    assert snapshot(tmp) == before, f"files changed under {tmp}"
    assert not (tmp / "PWNED").exists(), "an adapter's pickle ran code"
    assert not any(cwd.iterdir()), f"files written in the working directory: {list(cwd.iterdir())}"


def _params(verbs: tuple[str, ...]) -> list:
    params = []
    for name, bad in CASES.items():
        applies = bad.verbs or (("run", "validate", "plan") if bad.static else ("run",))
        params += [pytest.param(verb, name, id=f"{verb}-{name}") for verb in verbs if verb in applies]
    return params


@pytest.fixture
def cwd(tmp_path_factory, monkeypatch) -> Path:
    """An empty working directory, so relative paths resolved against it (not the recipe) are caught."""
    folder = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize(("verb", "name"), _params(("run", "validate", "plan")))
def test_bad_input(zoo, tmp_path, capfd, cwd, verb, name):
    bad = CASES[name]
    argv = _argv(verb, bad, zoo, tmp_path)
    before = snapshot(tmp_path)
    _check(run_cli(argv, capfd), bad, before, tmp_path, cwd)


SUBPROCESS_CASES = [
    "malformed_yaml",
    "cli_seed_not_an_int",
    "adapter_with_nan",
    "unknown_nested_key",
    "missing_base_folder",
    "adapter_for_another_base",
    "truncated_base_safetensors",
    "pickled_bin_adapter_torch_zip",
    "pickled_bin_adapter_raw",
    "output_exists_without_force",
]


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_subprocess(zoo, tmp_path, cwd, name):
    """What a shell user sees: `python -m loracook run ...` exits 2 with one clean line (no warnings either)."""
    bad = CASES[name]
    argv = _argv("run", bad, zoo, tmp_path)
    before = snapshot(tmp_path)
    _check(run_cli_subprocess(argv, cwd=cwd), bad, before, tmp_path, cwd)


def test_output_exists_is_left_untouched(zoo, tmp_path, capfd, cwd):
    """Spelled out: the existing folder keeps exactly its content."""
    argv = _argv("run", CASES["output_exists_without_force"], zoo, tmp_path)
    assert run_cli(argv, capfd).code == 2
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["precious.txt"]
    assert (tmp_path / "out" / "precious.txt").read_text() == "do not touch"


def test_evil_pickle_is_really_evil(tmp_path):
    """Guard for the pickle cases: unpickling the payload does run code, so "no marker" means "refused"."""
    payload = pickle.dumps({"x": _Evil(tmp_path / "PWNED")})
    pickle.loads(payload)
    assert (tmp_path / "PWNED").exists()


def test_enough_cases():
    assert len(CASES) >= 25
    assert all(name.isidentifier() for name in CASES)
