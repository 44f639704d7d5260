"""Reliability (issue 16): nothing lost, nothing broken written, no traceback, under hostile input, faults and
concurrent runs. Each group tests one mechanism, and each mechanism makes a whole class of failure impossible:

- the output path rule (``loracook.io.writer``): never replace an input, the recipe's folder, the current folder;
  checked again under a lock at commit; temporary names that the next run recognises;
- signals (``loracook.io.signals``) and the top-level OSError handler in ``loracook.cli.main``;
- the bounded YAML loader (``loracook.io.safe_yaml``);
- linear-time user regexes (``loracook.safe_regex``);
- files validated at the io/ door (``loracook.io.checkpoint``, ``loracook.io.tensors``);
- the GGUF header-only view (``loracook.io.checkpoint.gguf_header_checkpoint``).

Models and adapters here are written directly with safetensors (a 2-layer, hidden-8 Llama), so the file needs no
transformers or PEFT and stays fast. Faults that need a process of their own (signals, ``ulimit -f``, dropped
capabilities, a read-only mount, two runs at once) are all started together by one fixture and run in parallel.
"""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import OFFLINE_ENV, REPO_ROOT, run_cli
from safetensors.torch import save_file

from loracook.errors import BadInput, os_error_line
from loracook.io import signals, writer
from loracook.io.checkpoint import open_checkpoint, read_config
from loracook.io.safe_yaml import MAX_ALIASES, decode_utf8, parse_yaml
from loracook.io.tensors import read_header
from loracook.io.writer import OutputFolder, check_destination, rename_noreplace, sweep_stale, temp_prefix

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------------ worlds


def tiny_model(folder: Path, *, layers: int = 2, hidden: int = 8, inter: int = 16, vocab: int = 16) -> Path:
    """A Llama-shaped model folder (config.json + model.safetensors), written without transformers."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen),
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden, generator=gen),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=gen)
        tensors[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=gen)
        tensors[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=gen)
        tensors[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=gen)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def tiny_adapter(folder: Path, base: Path, *, layers: int = 2, hidden: int = 8, r: int = 2) -> Path:
    """A PEFT LoRA folder on q_proj/v_proj of :func:`tiny_model`, written without PEFT."""
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i in range(layers):
        for name in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[key + ".lora_A.weight"] = 0.1 * torch.randn(r, hidden, generator=gen)
            tensors[key + ".lora_B.weight"] = 0.1 * torch.randn(hidden, r, generator=gen)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@dataclass(frozen=True)
class World:
    """A recipe folder with a base, an adapter and (optionally) a fine-tune to extract from."""

    root: Path
    recipe: Path
    base: Path
    adapter: Path
    tuned: Path

    @property
    def out(self) -> Path:
        return self.root / "out"

    def sums(self) -> dict[str, str]:
        """Checksums of every input file (and the recipe): must be byte-identical after any run."""
        return {
            **tree_sums(self.base),
            **tree_sums(self.adapter),
            **tree_sums(self.tuned),
            **file_sum(self.recipe),
        }

    def leftovers(self) -> list[str]:
        """Anything beside the inputs, the recipe and a finished output: temporary folders, lock files."""
        expected = {"base", "ad", "tuned", "recipe.yaml", "out", "barrier", "ro"}
        return sorted(p.name for p in self.root.iterdir() if p.name not in expected)


def make_world(root: Path, *, extract: bool = False, change=None, **output) -> World:
    base = tiny_model(root / "base")
    adapter = tiny_adapter(root / "ad", base)
    tuned = root / "tuned"
    tuned.mkdir(parents=True, exist_ok=True)
    sources: dict = {"a": "./ad"}
    if extract:
        shutil.copytree(base, tuned, dirs_exist_ok=True)
        _nudge(tuned)
        sources["x"] = {"extract": {"model": "./tuned", "rank": 2}}
    recipe = {
        "loracook": 1,
        "base": "./base",
        "sources": sources,
        "merge": {"method": "linear", "weights": {name: 1.0 for name in sources}},
        "output": {"kind": "model", "path": "./out", "dtype": "float32", **output},
    }
    if change is not None:
        change(recipe, root)
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return World(root, path, base, adapter, tuned)


def _nudge(folder: Path) -> None:
    """Make a fine-tune of the tiny base: a small change on every projection."""
    from safetensors.torch import load_file

    tensors = load_file(folder / "model.safetensors")
    for name, tensor in tensors.items():
        if name.endswith("proj.weight"):
            tensors[name] = tensor + 0.01 * torch.ones_like(tensor)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def tree_sums(root: Path) -> dict[str, str]:
    return {k: v for p in sorted(root.rglob("*")) if p.is_file() for k, v in file_sum(p).items()}


def file_sum(path: Path) -> dict[str, str]:
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest()}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one line on stderr, got:\n{err}"
    return lines[0]


@pytest.fixture
def world(tmp_path) -> World:
    return make_world(tmp_path / "w")


# =========================================================================== 1. the output path rule (unit)


def test_empty_and_dot_paths_are_refused(tmp_path):
    for raw in ("", ".", " "):
        with pytest.raises(BadInput, match="empty"):
            check_destination(raw, force=True)


@pytest.mark.parametrize("where", ["cwd", "cwd_parent", "home", "root"])
def test_special_folders_are_refused_even_with_force(tmp_path, monkeypatch, where):
    cwd = tmp_path / "deep" / "cwd"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    target = {"cwd": cwd, "cwd_parent": cwd.parent, "home": tmp_path / "home", "root": Path("/")}[where]
    with pytest.raises(BadInput, match="replace") as info:
        check_destination(target, force=True)
    assert "--output" in info.value.one_line()


@pytest.mark.parametrize("relation", ["is", "contains", "lies inside"])
def test_inputs_are_never_an_output(tmp_path, relation):
    base = tiny_model(tmp_path / "models" / "base")
    target = {"is": base, "contains": base.parent, "lies inside": base / "sub"}[relation]
    before = tree_sums(tmp_path)
    with pytest.raises(BadInput, match=f"output folder {relation} an input") as info:
        OutputFolder(target, force=True, protect=[base])
    assert "never" in info.value.one_line()
    assert tree_sums(tmp_path) == before and not (base / "sub").exists()


def test_the_recipe_folder_is_protected_through_the_recipe_file(tmp_path, monkeypatch):
    recipe = tmp_path / "r" / "recipe.yaml"
    recipe.parent.mkdir()
    recipe.write_text("loracook: 1\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadInput, match="contains an input"):
        check_destination(recipe.parent, force=True, protect=[recipe])
    check_destination(recipe.parent / "out", force=False, protect=[recipe])  # the usual ./out is fine


def test_symlinked_spellings_of_an_input_are_caught(tmp_path):
    base = tiny_model(tmp_path / "base")
    (tmp_path / "alias").symlink_to(base)
    with pytest.raises(BadInput, match="input"):
        check_destination(tmp_path / "alias" / ".." / "base", force=True, protect=[tmp_path / "alias"])


def test_dangling_symlink_is_refused_before_work(tmp_path):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    with pytest.raises(BadInput, match="dangling") as info:
        OutputFolder(tmp_path / "out", force=True)
    assert "link" in info.value.one_line()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_symlink_to_a_folder_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with pytest.raises(BadInput, match="symbolic link"):
        check_destination(tmp_path / "out", force=True)


def test_a_file_at_the_output_or_in_its_path_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(BadInput, match="is a file"):
        check_destination(tmp_path / "afile", force=True)
    with pytest.raises(BadInput, match="part of the output path is a file"):
        check_destination(tmp_path / "afile" / "sub" / "out", force=True)


def test_existing_output_needs_force(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(BadInput, match="already exists") as info:
        check_destination(tmp_path / "out", force=False)
    assert "--force" in info.value.one_line()


def _build(out: OutputFolder, text: str = "new") -> None:
    out.write_text("loracook_recipe.yaml", text)
    out.scratch("extract").joinpath("tmp.bin").write_bytes(b"scratch")


def test_commit_renames_into_place_and_leaves_nothing_beside(tmp_path):
    with OutputFolder(tmp_path / "a" / "out", force=False) as out:
        _build(out)
        out.commit()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "a" / "out").iterdir()) == ["loracook_recipe.yaml"]
    assert oct((tmp_path / "a" / "out").stat().st_mode & 0o777) == "0o755"


def test_failure_removes_the_temporary_folder_and_created_parents(tmp_path):
    with pytest.raises(RuntimeError), OutputFolder(tmp_path / "new" / "deeper" / "out", force=False) as out:
        _build(out)
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_force_keeps_the_old_output_when_the_run_fails(tmp_path):
    old = tmp_path / "out"
    old.mkdir()
    (old / "loracook_recipe.yaml").write_text("old")
    with pytest.raises(RuntimeError), OutputFolder(old, force=True) as out:
        _build(out)
        raise RuntimeError("boom")
    assert (old / "loracook_recipe.yaml").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_completely_even_a_read_only_old_output(tmp_path):
    old = tmp_path / "out"
    (old / "sub").mkdir(parents=True)
    (old / "stale.txt").write_text("stale")
    os.chmod(old / "sub", 0o555)
    with OutputFolder(old, force=True) as out:
        _build(out)
        out.commit()
    assert sorted(p.name for p in old.iterdir()) == ["loracook_recipe.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_that_appears_during_the_run_is_not_replaced(tmp_path):
    dest = tmp_path / "out"
    with OutputFolder(dest, force=False) as out:
        _build(out)
        dest.mkdir()
        (dest / "theirs.txt").write_text("another run's output")
        with pytest.raises(BadInput, match="appeared while this run was working"):
            out.commit()
    assert sorted(p.name for p in dest.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_commit_checks_the_destination_again(tmp_path):
    base = tiny_model(tmp_path / "base")
    dest = tmp_path / "out"
    with OutputFolder(dest, force=True, protect=[base]) as out:
        _build(out)
        dest.symlink_to(base)  # the path now leads into an input
        with pytest.raises(BadInput, match="input"):
            out.commit()
    assert dest.is_symlink() and (base / "model.safetensors").is_file()


@pytest.mark.parametrize("fallback", [False, True], ids=["renameat2", "mkdir-claim"])
def test_rename_noreplace_never_replaces(tmp_path, monkeypatch, fallback):
    if fallback:
        monkeypatch.setattr(writer, "_renameat2", lambda: None)
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "src", tmp_path / "dst")
    (tmp_path / "dst").rmdir()
    rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert (tmp_path / "dst").is_dir() and not (tmp_path / "src").exists()


def _racer(dest: str, barrier, force: bool) -> None:
    """One process of the race: build an output, wait for the other, commit; exit 0 on success, 2 if refused."""
    try:
        with OutputFolder(Path(dest), force=force) as out:
            out.write_text("loracook_recipe.yaml", str(os.getpid()))
            barrier.wait(timeout=60)
            out.commit()
    except BadInput:
        os._exit(2)
    os._exit(0)


@pytest.mark.parametrize("force", [False, True], ids=["no-force", "force"])
def test_two_concurrent_commits_exactly_one_wins(tmp_path, force):
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(2)
    dest = tmp_path / "out"
    runs = [context.Process(target=_racer, args=(str(dest), barrier, force)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(60)
    codes = sorted(run.exitcode for run in runs)
    assert codes == ([0, 0] if force else [0, 2]), codes
    assert (dest / "loracook_recipe.yaml").read_text() in {str(r.pid) for r in runs}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------ stale sweep


def _fake_temp(parent: Path, name: str, kind: str, pid: int, age: float) -> Path:
    folder = parent / f".{name}.loracook-{kind}-{pid}-{int(time.time() - age)}-abc123"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"half")
    return folder


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_temporary_folders_of_dead_runs(tmp_path):
    dead = _fake_temp(tmp_path, "out", "new", _dead_pid(), age=5)
    alive = _fake_temp(tmp_path, "out", "new", os.getppid(), age=5)
    old_but_alive = _fake_temp(tmp_path, "other", "new", os.getppid(), age=7200)
    (tmp_path / "unrelated").mkdir()
    removed = sweep_stale(tmp_path)
    assert set(removed) == {dead, old_but_alive}
    assert alive.exists() and (tmp_path / "unrelated").exists()


def test_sweep_keeps_a_folder_whose_owner_holds_its_lock(tmp_path):
    with OutputFolder(tmp_path / "out", force=False) as out:
        os.utime(out.tmp, (0, 0))
        assert sweep_stale(tmp_path, now=time.time() + 10 * 3600) == []
        assert out.tmp.exists()


def test_sweep_puts_back_an_old_output_that_a_killed_commit_moved_aside(tmp_path):
    aside = _fake_temp(tmp_path, "out", "old", _dead_pid(), age=5)
    sweep_stale(tmp_path)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"half"
    assert not aside.exists()


def test_next_run_sweeps_its_parent(tmp_path):
    stale = _fake_temp(tmp_path, "merged", "new", _dead_pid(), age=5)
    (tmp_path / ".merged.loracook-lock").write_text("")
    with OutputFolder(tmp_path / "out", force=False) as out:
        out.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], stale


def test_temporary_names_embed_pid_and_time():
    prefix = temp_prefix("merged")
    assert prefix.startswith(f".merged.loracook-new-{os.getpid()}-")
    assert writer._TEMP_NAME.match(prefix + "abc_123")


# ================================================================================ 2. the CLI in-process


def test_cli_output_empty_string(world, capfd, monkeypatch):
    monkeypatch.chdir(world.root)
    before = world.sums()
    res = run_cli(["run", world.recipe, "--output", ""], capfd)
    assert res.code == 2 and "empty" in one_line(res.err)
    assert world.sums() == before and world.leftovers() == []


def test_cli_output_is_the_recipe_folder_with_force(world, capfd, monkeypatch):
    monkeypatch.chdir(world.root)
    before = world.sums()
    res = run_cli(["run", world.recipe, "--output", ".", "--force"], capfd)
    assert res.code == 2, str(res)
    one_line(res.err)
    assert world.sums() == before and world.leftovers() == []


def test_cli_output_is_the_recipe_folder_by_absolute_path(world, capfd, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = world.sums()
    res = run_cli(["run", world.recipe, "--output", world.root, "--force"], capfd)
    assert res.code == 2 and "input" in one_line(res.err), str(res)
    assert world.sums() == before


@pytest.mark.parametrize("which", ["base", "adapter"])
def test_cli_force_onto_an_input(world, capfd, which):
    target = world.base if which == "base" else world.adapter
    before = world.sums()
    res = run_cli(["run", world.recipe, "--output", target, "--force"], capfd)
    assert res.code == 2 and "input" in one_line(res.err), str(res)
    assert world.sums() == before and world.leftovers() == []


def test_cli_force_onto_the_fine_tune_of_an_extract_source(tmp_path, capfd):
    world = make_world(tmp_path / "w", extract=True)
    before = world.sums()
    res = run_cli(["run", world.recipe, "--output", world.tuned, "--force", "--quiet"], capfd)
    assert res.code == 2 and "input" in one_line(res.err), str(res)
    assert world.sums() == before and world.leftovers() == []


def test_cli_recipe_output_path_dot_with_force(tmp_path, capfd):
    world = make_world(tmp_path / "w", change=lambda recipe, root: recipe["output"].update(path="."))
    before = world.sums()
    res = run_cli(["run", world.recipe, "--force", "--quiet"], capfd)
    assert res.code == 2, str(res)
    one_line(res.err)
    assert world.sums() == before and world.leftovers() == []


def test_cli_recipe_folder_without_inputs_is_protected(world, capfd, tmp_path, monkeypatch):
    """`output.path: .` with --force must not replace the folder that holds the recipe, even when no input
    lives there (the engine passes the recipe file in protect=)."""
    folder = world.root / "recipes"
    folder.mkdir()
    recipe = yaml.safe_load(world.recipe.read_text())
    recipe.update(
        base="../base", sources={"a": "../ad"}, output={"kind": "model", "path": ".", "dtype": "float32"}
    )
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    monkeypatch.chdir(tmp_path)
    res = run_cli(["run", path, "--force", "--quiet"], capfd)
    assert res.code == 2 and path.is_file(), str(res)
    one_line(res.err)


def test_cli_dangling_symlink_output(world, capfd):
    (world.root / "out").symlink_to(world.root / "nowhere")
    res = run_cli(["run", world.recipe, "--output", world.root / "out", "--force"], capfd)
    assert res.code == 2 and "link" in one_line(res.err), str(res)
    assert world.leftovers() == []


def test_cli_run_succeeds_and_leaves_nothing_beside(world, capfd):
    res = run_cli(["run", world.recipe, "--quiet"], capfd)
    assert res.code == 0, str(res)
    assert (world.out / "model.safetensors").is_file() and world.leftovers() == []


def test_cli_full_disk_is_one_line(world, capfd, monkeypatch):
    """ENOSPC from the kernel (/dev/full) while the shards are written: one line with the file and the fix."""
    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        if str(path).endswith(".safetensors") and "w" in mode:
            return real_open("/dev/full", mode, *args, **kwargs)
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(writer, "open", full_disk, raising=False)
    before = world.sums()
    res = run_cli(["run", world.recipe, "--quiet"], capfd)
    line = one_line(res.err)
    assert res.code == 2 and "no space" in line and "model.safetensors" in line, str(res)
    assert world.sums() == before and world.leftovers() == [] and not world.out.exists()


def test_cli_commit_race_in_process(world, capfd, monkeypatch):
    """Another run writes the output while this one works: refused at commit, theirs kept, ours removed."""
    commit = OutputFolder.commit

    def late(self):
        self.dest.mkdir()
        (self.dest / "theirs").write_text("x")
        return commit(self)

    monkeypatch.setattr(OutputFolder, "commit", late)
    res = run_cli(["run", world.recipe, "--quiet"], capfd)
    assert res.code == 2 and "appeared" in one_line(res.err), str(res)
    assert sorted(p.name for p in world.out.iterdir()) == ["theirs"] and world.leftovers() == []


@pytest.mark.parametrize(
    "code", [errno.EACCES, errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.ENOTDIR, errno.ENOENT, errno.EDQUOT]
)
def test_top_level_handler_turns_environment_errors_into_one_line(capfd, monkeypatch, code):
    import loracook.cli as cli

    def broken(args):
        raise OSError(code, os.strerror(code), "/some/where/model.safetensors")

    monkeypatch.setattr(cli, "_cmd_validate", broken)
    res = run_cli(["validate", "x.yaml"], capfd)
    line = one_line(res.err)
    assert res.code == 2 and "/some/where/model.safetensors" in line and ";" in line
    assert errno.errorcode[code] in line


def test_top_level_handler_keeps_tracebacks_for_bugs(capfd, monkeypatch):
    import loracook.cli as cli

    def broken(args):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(cli, "_cmd_validate", broken)
    with pytest.raises(OSError):
        cli.main(["validate", "x.yaml"])


@pytest.mark.parametrize("hidden_by", ["os_error", "bad_input"])
def test_a_cleanup_that_fails_while_a_signal_unwinds_does_not_hide_the_signal(capfd, monkeypatch, hidden_by):
    """A library's ``except BaseException: cleanup(); raise`` whose cleanup fails replaces our Terminated with its
    own error (Optuna's journal lock did: FileNotFoundError on its .rename file). The exit is still the signal's."""
    import loracook.cli as cli

    def stopped_then_hidden(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises Terminated here
        except BaseException:
            if hidden_by == "os_error":
                raise FileNotFoundError(
                    errno.ENOENT, "No such file", "/x/journal.log.lock1234.rename"
                ) from None
            raise BadInput("something about the half-done work") from None
        return 0

    monkeypatch.setattr(cli, "_cmd_validate", stopped_then_hidden)
    res = run_cli(["validate", "x.yaml"], capfd)
    assert res.code == 143 and "SIGTERM" in one_line(res.err) and "rename" not in res.err, str(res)


def test_os_error_line_names_both_paths_of_a_rename():
    line = os_error_line(OSError(errno.EXDEV, "x", "/a", None, "/b"))
    assert line is None
    line = os_error_line(OSError(errno.EACCES, "Permission denied", "/a", None, "/b"))
    assert line is not None and "/a -> /b" in line and "permission denied" in line


def test_signal_handlers_are_restored_and_sigxfsz_ignored_only_inside():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGXFSZ)
    with signals.handling_signals():
        assert signal.getsignal(signal.SIGXFSZ) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signals._on_signal
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGXFSZ)) == before


def test_deferred_signals_wait_for_the_end_of_the_section():
    with signals.handling_signals():
        with pytest.raises(signals.Terminated) as info:
            with signals.deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                finished = True
        assert finished and info.value.exit_code == 143


def test_cleanups_run_once_and_survive_a_failing_one():
    calls: list[str] = []
    signals.register_cleanup(lambda: calls.append("a"))
    signals.register_cleanup(lambda: 1 / 0)
    token = signals.register_cleanup(lambda: calls.append("never"))
    signals.unregister_cleanup(token)
    signals.run_cleanups()
    signals.run_cleanups()
    assert calls == ["a"]


# =============================================================================== 3. faults in subprocesses

ZYGOTE = r"""
# Imports torch and loracook once, then forks one child per scenario: each child sets up its fault, runs
# loracook.cli.main and exits with its code. One interpreter start instead of one per scenario.
import ctypes, json, os, resource, signal, sys, time, traceback
from pathlib import Path

import torch  # noqa: F401 - imported before the forks; no torch op runs before them
import loracook.cli
import loracook.engine  # noqa: F401
from loracook.io import tensors, writer

MS_RDONLY, MS_REC, MS_PRIVATE, CLONE_NEWNS = 1, 16384, 1 << 18, 0x00020000


def once(function, sig):
    state = {"done": False}

    def wrapper(*args, **kwargs):
        if not state["done"]:
            state["done"] = True
            os.kill(os.getpid(), sig)
            time.sleep(0.2)  # the main thread takes the signal at its next bytecode
        return function(*args, **kwargs)

    return wrapper


def install(fault):
    kind, _, name = fault.partition(":")
    sig = getattr(signal, name) if name else None
    if kind == "write":  # while the first block of the first shard is written
        writer._ShardFile.write = once(writer._ShardFile.write, sig)
    elif kind == "commit":  # inside the commit, between moving an old output aside and the new one in
        writer.rename_noreplace = once(writer.rename_noreplace, sig)
    elif kind == "read":  # at the first tensor read (an extraction reads the fine-tune first)
        tensors.TensorReader.read = once(tensors.TensorReader.read, sig)
    elif kind == "barrier":  # two runs meet before their commits
        commit = writer.OutputFolder.commit

        def met(self):
            folder = Path(os.environ["LC_BARRIER"])
            (folder / str(os.getpid())).touch()
            deadline = time.time() + 120
            while len(os.listdir(folder)) < 2 and time.time() < deadline:
                time.sleep(0.02)
            return commit(self)

        writer.OutputFolder.commit = met


def drop_dac():
    # Root ignores permission bits through CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH: drop both.
    if os.geteuid() != 0:
        return

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget failed")
    mask = ~0b110 & 0xFFFFFFFF
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & mask)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed (cannot drop CAP_DAC_OVERRIDE)")


def read_only_mount(folder):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS) failed")
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate / failed")
    if libc.mount(b"none", folder.encode(), b"tmpfs", MS_RDONLY, b"size=1m") != 0:
        raise OSError(ctypes.get_errno(), "mounting a read-only tmpfs failed")


def child(scenario):
    os.chdir(scenario["cwd"])
    err = os.open(scenario["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.environ.update(scenario.get("env", {}))
    try:
        if scenario.get("fsize"):
            resource.setrlimit(resource.RLIMIT_FSIZE, (scenario["fsize"], scenario["fsize"]))
        if scenario.get("drop_dac"):
            drop_dac()
        if scenario.get("ro_mount"):
            read_only_mount(scenario["ro_mount"])
    except OSError as exc:
        os.write(2, f"SKIP: {exc}\n".encode())
        os._exit(77)
    install(scenario.get("fault", ""))
    signal.alarm(scenario.get("alarm", 120))  # a hang (a backtracking regex) ends as -SIGALRM, not forever
    try:
        code = loracook.cli.main(scenario["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    os._exit(code)


plan = json.loads(Path(sys.argv[1]).read_text())
children = {}
for scenario in plan:
    pid = os.fork()
    if pid == 0:
        child(scenario)
    children[pid] = scenario["name"]
results = {}
while children:
    pid, status = os.wait()
    results[children.pop(pid)] = os.waitstatus_to_exitcode(status)
Path(sys.argv[2]).write_text(json.dumps(results))
"""


@dataclass
class Launched:
    world: World
    stderr: Path
    before: dict
    zygote: subprocess.Popen
    results: Path

    def result(self) -> tuple[int, str]:
        if self.zygote.poll() is None:
            self.zygote.wait(timeout=300)
        assert self.results.is_file(), f"the fault driver failed: {self.zygote.stderr.read()}"
        code = json.loads(self.results.read_text())[self.stderr.stem]
        err = self.stderr.read_text()
        if code == 77 and err.startswith("SKIP:"):
            print(err)  # the reason is printed: pytest -rs shows it too
            pytest.skip(err.strip())
        return code, err


@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> dict[str, Launched]:
    """Every scenario that needs a process of its own, forked together from one interpreter (the cost of
    `import torch` is paid once) and run in parallel; each test then waits for its scenario."""
    root = tmp_path_factory.mktemp("faults")
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO_ROOT), "LORACOOK_CACHE": str(root / "cache")}
    plan: list[dict] = []
    worlds: dict[str, World] = {}

    def add(name: str, args: list[str], world: World | None = None, **options) -> None:
        world = world or make_world(root / name)
        worlds[name] = world
        argv = [str(a) for a in args]
        plan.append({"name": name, "cwd": str(world.root), "argv": argv, "stderr": str(root / f"{name}.err")})
        plan[-1].update(options)

    run = ["run", "recipe.yaml", "--quiet"]
    for sig in ("SIGTERM", "SIGINT", "SIGKILL"):
        add(f"write-{sig}", run, fault=f"write:{sig}")
    add("commit-SIGTERM", run, fault="commit:SIGTERM")
    forced = make_world(root / "commit-force-SIGKILL")
    _old_output(forced)
    add("commit-force-SIGKILL", [*run, "--force"], forced, fault="commit:SIGKILL")
    add("extract-SIGTERM", run, make_world(root / "extract-SIGTERM", extract=True), fault="read:SIGTERM")
    add("ulimit", run, fsize=4096)
    race = make_world(root / "race")
    (race.root / "barrier").mkdir()
    for i in range(2):
        add(f"race-{i}", run, race, fault="barrier", env={"LC_BARRIER": str(race.root / "barrier")})
    for name in ("eacces", "erofs"):
        world = make_world(root / name)
        (world.root / "ro").mkdir()
        if name == "eacces":
            os.chmod(world.root / "ro", 0o555)
            add(name, [*run, "--output", "ro/out"], world, drop_dac=True)
        else:
            add(name, [*run, "--output", "ro/out"], world, ro_mount=str(world.root / "ro"))
    validate = ["validate", "recipe.yaml"]
    for name, change in REGEX_BOMBS.items():
        add(name, validate, make_world(root / name, extract=name == "regex-extract", change=change), alarm=20)
    gguf = make_world(root / "gguf-validate", change=_gguf_base)
    add("gguf-validate", validate, gguf, env={"LORACOOK_CACHE": str(gguf.root / "cache")})
    unwritable = make_world(root / "gguf-run-cache", change=_gguf_base)
    (unwritable.root / "afile").write_text("a file, not a folder")
    add("gguf-run-cache", run, unwritable, env={"LORACOOK_CACHE": str(unwritable.root / "afile" / "cache")})
    befores = {name: world.sums() for name, world in worlds.items()}
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "zygote.py").write_text(ZYGOTE)
    zygote = subprocess.Popen(
        [sys.executable, str(root / "zygote.py"), str(root / "plan.json"), str(root / "results.json")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield {
        name: Launched(world, root / f"{name}.err", befores[name], zygote, root / "results.json")
        for name, world in worlds.items()
    }
    if zygote.poll() is None:
        zygote.kill()


BACKTRACKING = r"([a-z_.0-9]+)*!"  # exponential in the length of every tensor name for a backtracking engine


def _filter_bomb(recipe: dict, root: Path) -> None:
    recipe["merge"]["weights"]["a"] = [{"filter": BACKTRACKING, "value": 0.5}, {"value": 1.0}]


def _extract_bomb(recipe: dict, root: Path) -> None:
    recipe["sources"]["x"]["extract"]["include"] = [BACKTRACKING]


def _rank_pattern(key: str):
    def change(recipe: dict, root: Path) -> None:
        config = json.loads((root / "ad" / "adapter_config.json").read_text())
        config["rank_pattern"] = {key: 2}
        (root / "ad" / "adapter_config.json").write_text(json.dumps(config))

    return change


REGEX_BOMBS = {
    "regex-filter": _filter_bomb,
    "regex-extract": _extract_bomb,
    "regex-rank-pattern": _rank_pattern(BACKTRACKING),
    "regex-rank-pattern-invalid": _rank_pattern("q_proj("),
}


def _gguf_base(recipe: dict, root: Path) -> None:
    tiny_gguf(root / "pkg" / "tiny.gguf")
    recipe["base"] = {"path": "./pkg", "gguf_file": "tiny.gguf"}


def _old_output(world: World) -> None:
    world.out.mkdir()
    (world.out / "loracook_recipe.yaml").write_text("the previous output")


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_during_the_write(faults, sig, code):
    item = faults[f"write-{sig}"]
    rc, err = item.result()
    line = one_line(err)
    assert rc == code, err
    assert ("SIGTERM" in line) if sig == "SIGTERM" else ("interrupted" in line)
    assert not item.world.out.exists() and item.world.leftovers() == []
    assert item.world.sums() == item.before


def test_sigkill_during_the_write_is_cleaned_by_the_next_run(faults, capfd):
    item = faults["write-SIGKILL"]
    rc, _ = item.result()
    assert rc == -signal.SIGKILL
    assert not item.world.out.exists()
    left = item.world.leftovers()
    assert left and all(".loracook-" in name for name in left), left
    res = run_cli(["run", item.world.recipe, "--quiet"], capfd)
    assert res.code == 0, str(res)
    assert item.world.leftovers() == [] and (item.world.out / "model.safetensors").is_file()
    assert item.world.sums() == item.before


def test_sigterm_during_the_commit_completes_it(faults):
    item = faults["commit-SIGTERM"]
    rc, err = item.result()
    assert rc == 143 and "SIGTERM" in one_line(err)
    assert (item.world.out / "model.safetensors").is_file() and item.world.leftovers() == []


def test_sigkill_mid_commit_with_force_restores_the_old_output(faults):
    item = faults["commit-force-SIGKILL"]
    rc, _ = item.result()
    assert rc == -signal.SIGKILL
    assert not item.world.out.exists()  # the old output is aside, the new one not yet in
    sweep_stale(item.world.root)
    assert (item.world.out / "loracook_recipe.yaml").read_text() == "the previous output"
    assert item.world.leftovers() == []


def test_sigterm_during_an_extraction(faults):
    item = faults["extract-SIGTERM"]
    rc, err = item.result()
    assert rc == 143 and "SIGTERM" in one_line(err)
    assert not item.world.out.exists() and item.world.leftovers() == []
    assert item.world.sums() == item.before


def test_file_size_limit_mid_write(faults):
    item = faults["ulimit"]
    rc, err = item.result()
    line = one_line(err)
    assert rc == 2 and "EFBIG" in line and "ulimit" in line, err
    assert not item.world.out.exists() and item.world.leftovers() == []


def test_two_concurrent_runs_exactly_one_wins(faults):
    results = sorted([faults["race-0"].result(), faults["race-1"].result()])
    (ok, _), (refused, err) = results
    assert (ok, refused) == (0, 2), results
    assert "appeared" in one_line(err)
    world = faults["race-0"].world
    assert (world.out / "model.safetensors").is_file() and world.leftovers() == []


@pytest.mark.parametrize("name,words", [("eacces", ("permission denied",)), ("erofs", ("read-only",))])
def test_read_only_output_folder(faults, name, words):
    item = faults[name]
    rc, err = item.result()
    line = one_line(err)
    assert rc == 2 and all(w in line.lower() for w in words), err
    assert "ro" in line and not (item.world.root / "ro" / "out").exists()
    assert item.world.leftovers() == [] and item.world.sums() == item.before


@pytest.mark.parametrize("name", ["regex-filter", "regex-extract", "regex-rank-pattern"])
def test_backtracking_user_regexes_do_not_hang_validate(faults, name):
    rc, err = faults[name].result()
    assert rc == 0, (rc, err)


def test_rank_pattern_key_that_is_not_a_regex(faults):
    rc, err = faults["regex-rank-pattern-invalid"].result()
    line = one_line(err)
    assert rc == 2 and "adapter_config.json" in line and "q_proj(" in line


def test_validate_with_a_gguf_base_reads_the_header_only(faults):
    item = faults["gguf-validate"]
    rc, err = item.result()
    assert rc == 0, err
    assert not (item.world.root / "cache").exists(), "validate dequantized the GGUF into the cache"


def test_run_with_a_gguf_base_and_an_unwritable_cache(faults):
    item = faults["gguf-run-cache"]
    rc, err = item.result()
    line = one_line(err)
    assert rc == 2 and "LORACOOK_CACHE" in line, err
    assert not item.world.out.exists() and item.world.sums() == item.before


# ===================================================================================== 4. the bounded YAML


def _bomb(levels: int = 9) -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        prev, name = chr(96 + i), chr(97 + i)
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


YAML_BAD = {
    "alias_bomb": (_bomb(), 4, "alias bomb"),
    "recursive_alias_list": ("a: &a [1, *a]\n", 1, "recursive"),
    "recursive_alias_map": ("a: &a\n  b: *a\n", 2, "recursive"),
    "deep_flow_600": ("x: " + "[" * 600 + "]" * 600 + "\n", 1, "deep"),
    "deep_block_600": "".join("  " * i + f"k{i}:\n" for i in range(600)) + "  " * 600 + "v: 1\n",
    "deep_dashes": ("x:\n" + "- " * 600 + "1\n", 2, "deep"),
    "too_many_aliases": ("a: &a 1\nb: [" + ",".join(["*a"] * (MAX_ALIASES + 1)) + "]\n", 2, "aliases"),
    "duplicate_key": ("a: 1\nb: 2\na: 3\n", 3, "duplicate"),
    "duplicate_after_merge_twice": ("d: &d {x: 1}\nm:\n  <<: *d\n  y: 1\n  y: 2\n", 5, "duplicate"),
    "duplicate_inside_merged": ("d: &d {x: 1, x: 2}\nm:\n  <<: *d\n", 1, "duplicate"),
    "merge_of_a_scalar": ("m:\n  <<: 5\n", 2, "merg"),
    "complex_key": ("? [a, b]\n: 1\n", 1, "key"),
    "nul_character": ("a: 1\nb: \x00\n", 2, "control character"),
    "escape_character": ("a: 1\n\x1b[31m: 2\n", 2, "control character"),
    "huge_integer": ("a: " + "9" * 5000 + "\n", None, "could not be read"),
    "two_documents": ("a: 1\n---\nb: 2\n", 2, "single document"),
    "undefined_alias": ("a: *nope\n", 1, "undefined alias"),
    "python_tag": ("a: !!python/object:os.system x\n", 1, "constructor"),
    "tab_indent": ("a:\n\tb: 1\n", 2, "malformed"),
    "unclosed_quote": ('a: "x\n', None, "malformed"),
    "too_long": ("a: " + "x" * (1024 * 1024 + 1) + "\n", None, "limited"),
}
YAML_BAD["deep_block_600"] = (YAML_BAD["deep_block_600"], 64, "deep")


@pytest.mark.parametrize("name", sorted(YAML_BAD))
def test_bounded_yaml_refuses_cleanly(name):
    text, line, words = YAML_BAD[name]
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BadInput) as info:
            parse_yaml(text, "r.yaml")
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - start < 5 and peak < 64 * 2**20, (name, peak)
    message = info.value.one_line()
    assert message.startswith("r.yaml") and words in message.lower(), message
    if line is not None:
        assert info.value.line == line, message


def test_pure_python_yaml_fallback_has_the_same_bounds(monkeypatch):
    """Where PyYAML has no libyaml, the same bounded composer runs over PyYAML's own parser."""
    import importlib.util

    import loracook.io.safe_yaml as original

    monkeypatch.setitem(sys.modules, "yaml.cyaml", None)
    spec = importlib.util.spec_from_file_location("safe_yaml_without_libyaml", original.__file__)
    fallback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fallback)
    assert fallback._CParser is None
    for name in ("alias_bomb", "recursive_alias_map", "duplicate_key", "deep_block_600", "nul_character"):
        text, line, words = YAML_BAD[name]
        with pytest.raises(BadInput) as info:
            fallback.parse_yaml(text, "r.yaml")
        assert words in info.value.one_line().lower() and info.value.line == line, name
    data, positions = fallback.parse_yaml("d: &d {x: 1}\nm:\n  <<: *d\n  x: 2\n", "r.yaml")
    assert data["m"] == {"x": 2} and positions[("m", "x")] == (4, 3)


def test_merge_key_with_override_is_accepted_with_positions():
    text = "defaults: &d {kind: model, dtype: float32}\noutput:\n  <<: *d\n  dtype: bfloat16\n"
    data, positions = parse_yaml(text, "r.yaml")
    assert data["output"] == {"kind": "model", "dtype": "bfloat16"}
    assert positions[("output", "dtype")] == (4, 3)  # the override
    assert positions[("output", "kind")] == (1, 15)  # where the merged value is written


def test_merge_list_first_wins_like_pyyaml():
    text = "a: &a {x: 1}\nb: &b {x: 2, y: 3}\nm:\n  <<: [*a, *b]\n"
    data, _ = parse_yaml(text, "r.yaml")
    assert data["m"] == yaml.safe_load(text)["m"] == {"x": 1, "y": 3}


def test_a_few_aliases_are_fine():
    data, _ = parse_yaml("w: &w [0.1, 0.5, 1.0]\nmerge: {a: *w, b: *w}\n", "r.yaml")
    assert data["merge"]["a"] == [0.1, 0.5, 1.0]


@pytest.mark.parametrize(
    "raw,line,column,words",
    [
        (b"loracook: 1\nname: caf\xe9\n", 2, 10, "iconv"),
        (b"\xff\xfel\x00o\x00", None, None, "UTF-16"),
        (b"\x00\x00\xfe\xff", None, None, "UTF-32"),
        (b"\x89PNG\r\n\x1a\n", 1, 1, "not UTF-8"),
    ],
    ids=["latin1", "utf16", "utf32", "binary"],
)
def test_non_utf8_recipes_get_a_line_and_a_fix(raw, line, column, words):
    with pytest.raises(BadInput) as info:
        decode_utf8(raw, "r.yaml")
    assert (info.value.line, info.value.column) == (line, column)
    assert words in info.value.one_line()


def test_load_recipe_file_errors(tmp_path, capfd):
    (tmp_path / "latin1.yaml").write_bytes(b"loracook: 1\nname: caf\xe9\n")
    (tmp_path / "folder.yaml").mkdir()
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "big.yaml").write_bytes(b"#" * (1024 * 1024 + 10))
    expected = {
        "latin1.yaml": ":2:10:",
        "folder.yaml": "folder",
        "fifo.yaml": "regular",
        "big.yaml": "larger",
    }
    for name, words in expected.items():
        res = run_cli(["validate", tmp_path / name], capfd)
        assert res.code == 2 and words in one_line(res.err), (name, str(res))


def test_recipe_errors_in_merged_values_point_at_the_definition(tmp_path):
    from loracook.recipe import load_recipe_text

    text = (
        "loracook: 1\nbase: ./b\nsources: {a: ./a}\n"
        "merge:\n  <<: {method: linear, bogus: 1}\n  weights: {a: 1.0}\noutput: {path: ./o}\n"
    )
    with pytest.raises(BadInput) as info:
        load_recipe_text(text, tmp_path / "r.yaml")
    assert "bogus" in info.value.one_line() and info.value.line == 5, info.value.one_line()


# ======================================================================================= 5. safe regexes


def test_catastrophic_regex_does_not_hang():
    from loracook.safe_regex import ENGINE, compile_regex

    if ENGINE != "re2":
        pytest.skip("google-re2 is not installed: the fallback refuses such patterns (tested below)")
    pattern = compile_regex(r"(a+)+$")
    start = time.perf_counter()
    assert not pattern.search("a" * 100_000 + "!")
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "pattern,words",
    [
        ("(", "does not compile"),
        ("[a-", "does not compile"),
        ("(?=x)q_proj", "linear time"),
        (r"(a)\1", "linear time"),
        ("x" * 3000, "characters long"),
    ],
)
def test_bad_user_regexes_are_one_line(pattern, words):
    from loracook.safe_regex import RegexError, compile_regex

    with pytest.raises(RegexError) as info:
        compile_regex(pattern, what="merge.weights.a filter")
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith("merge.weights.a filter")


def test_fallback_engine_refuses_nested_repeats(monkeypatch):
    from loracook import safe_regex

    monkeypatch.setattr(safe_regex, "_re2", None)
    safe_regex._compile_cached.cache_clear()
    try:
        for bad in [r"(a+)+$", r"(a|ab)*c", r"(\w+\.)*q"]:
            with pytest.raises(safe_regex.RegexError, match="exponential"):
                safe_regex.compile_regex(bad)
        for good in [r"(.*\.)?(q_proj)$", r"layers\.[0-3]\.", r"a{2,5}", r"mlp|self_attn"]:
            assert safe_regex.compile_regex(good)
    finally:
        safe_regex._compile_cached.cache_clear()


@pytest.mark.parametrize(
    "patterns,module,expected",
    [
        ({"o_proj": 2}, "model.layers.0.self_attn.o_proj", 2),
        ({r"layers\.[1]\.self_attn\.v_proj": 4}, "model.layers.1.self_attn.v_proj", 4),
        ({r"layers\.[1]\.self_attn\.v_proj": 4}, "model.layers.11.self_attn.v_proj", 8),
        ({"proj": 3}, "model.layers.0.self_attn.q_proj", 8),
        ({"q_proj": 1, "proj": 3}, "q_proj", 1),
        ({"q_proj$": 5}, "model.q_proj", 5),
    ],
)
def test_peft_pattern_semantics(patterns, module, expected):
    import re

    from loracook.safe_regex import peft_pattern_value

    reference = next((v for k, v in patterns.items() if re.match(rf"(.*\.)?({k})$", module)), 8)
    assert peft_pattern_value(patterns, module, 8) == reference == expected


def test_re2_agrees_with_re_on_random_patterns():
    import re

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from loracook.safe_regex import RegexError, compile_regex

    atoms = st.sampled_from([r"q_proj", r"\.", r"\d", r"[0-3]", r"layers", r"mlp", ".", "a", r"\w"])
    pieces = st.lists(st.tuples(atoms, st.sampled_from(["", "*", "+", "?", "{1,2}"])), min_size=1, max_size=5)
    names = st.sampled_from(
        ["model.layers.0.self_attn.q_proj", "model.layers.13.mlp.down_proj", "lm_head", "a.b.c", ""]
    )

    @settings(max_examples=60, deadline=None, database=None)
    @given(pieces, st.booleans(), names)
    def check(parts, anchored, name):
        pattern = ("^" if anchored else "") + "".join(f"(?:{a}){q}" for a, q in parts)
        try:
            ours = compile_regex(pattern).search(name)
        except RegexError:
            return
        assert ours == (re.search(pattern, name) is not None), pattern

    check()


# ================================================================================ 6. files at the io/ door


def _model_with_config(tmp_path: Path, config_text: str | bytes) -> Path:
    folder = tiny_model(tmp_path / "m")
    path = folder / "config.json"
    path.write_bytes(config_text if isinstance(config_text, bytes) else config_text.encode())
    return folder


CONFIG_BAD = {
    "list": ("[1, 2]", "a list"),
    "null": ("null", "null"),
    "string": ('"llama"', "a string"),
    "number": ("3", "a number"),
    "not_json": ("{num_hidden_layers: 2", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "latin1": (b'{"name": "caf\xe9"}', "not valid JSON"),
    "deeply_nested": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "layers_string": ('{"num_hidden_layers": "two"}', "whole number"),
    "layers_negative": ('{"num_hidden_layers": -1}', "negative"),
    "layers_bool": ('{"num_hidden_layers": true}', "whole number"),
    "layers_float": ('{"num_hidden_layers": 2.5}', "whole number"),
    "layers_nan": ('{"num_hidden_layers": NaN}', "whole number"),
    "architectures_string": ('{"architectures": "LlamaForCausalLM"}', "a list"),
    "architectures_numbers": ('{"architectures": [1]}', "class names"),
    "text_config_list": ('{"text_config": [1]}', "an object"),
    "text_config_layers": ('{"text_config": {"num_hidden_layers": "x"}}', "text_config.num_hidden_layers"),
    "tie_string": ('{"tie_word_embeddings": "yes"}', "true or false"),
    "layers_more_than_weights": ('{"num_hidden_layers": 4}', "4 layers"),
    "layers_fewer_than_weights": ('{"num_hidden_layers": 1}', "1 layers"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_BAD))
def test_bad_config_json_is_one_line_naming_the_file(tmp_path, name):
    text, words = CONFIG_BAD[name]
    folder = _model_with_config(tmp_path, text)
    with pytest.raises(BadInput) as info:
        open_checkpoint(folder)
    message = info.value.one_line()
    assert "config.json" in message and words in message and ";" in message, message


def test_config_folder_instead_of_file(tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(BadInput, match="folder"):
        open_checkpoint(folder)


def test_layer_count_allows_announced_extra_layers(tmp_path):
    folder = _model_with_config(tmp_path, '{"num_hidden_layers": 1, "num_nextn_predict_layers": 1}')
    assert open_checkpoint(folder).num_layers == 1


def test_layer_count_is_not_checked_for_nested_configs(tmp_path):
    folder = _model_with_config(
        tmp_path, '{"num_hidden_layers": 7, "vision_config": {"num_hidden_layers": 2}}'
    )
    assert read_config(folder / "config.json")["num_hidden_layers"] == 7
    open_checkpoint(folder)


def test_an_adapter_folder_given_as_a_model(tmp_path):
    adapter = tiny_adapter(tmp_path / "ad", tmp_path / "base")
    with pytest.raises(BadInput, match="adapter folder, not a model"):
        open_checkpoint(adapter)


def _sharded(tmp_path: Path, weight_map) -> Path:
    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


INDEX_BAD = {
    "weight_map_list": (["model.safetensors"], "weight_map is a list"),
    "weight_map_null": (None, "no weight_map"),
    "weight_map_empty": ({}, "expected an object"),
    "shard_number": ({"lm_head.weight": 3}, "not a file name"),
    "shard_traversal": ({"lm_head.weight": "../../etc/passwd"}, "not a file name"),
    "shard_absolute": ({"lm_head.weight": "/etc/passwd"}, "not a file name"),
    "shard_missing": ({"lm_head.weight": "model-00002-of-00002.safetensors"}, "missing"),
    "tensor_not_in_shard": ({"nope.weight": "model.safetensors"}, "in no shard"),
}


@pytest.mark.parametrize("name", sorted(INDEX_BAD))
def test_bad_shard_index_is_one_line(tmp_path, name):
    weight_map, words = INDEX_BAD[name]
    folder = _sharded(tmp_path, weight_map)
    with pytest.raises(BadInput) as info:
        open_checkpoint(folder)
    message = info.value.one_line()
    assert "index.json" in message and words in message and ";" in message, message


def test_index_that_is_not_an_object(tmp_path):
    folder = tiny_model(tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(BadInput, match="no weight_map"):
        open_checkpoint(folder)


def _raw_safetensors(path: Path, header: dict, data: bytes = b"") -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    "header,words",
    [
        ({"t": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [0, 0]}}, "negative"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, "negative"),
        (
            {"__metadata__": ["x"], "t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
            "__metadata__",
        ),
        ({"__metadata__": {"a": 1}}, "__metadata__"),
        ({"t": 5}, "broken header"),
        ({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, "broken header"),
    ],
)
def test_bad_safetensors_headers(tmp_path, header, words):
    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 16)
    with pytest.raises(BadInput, match=words):
        read_header(path)


def test_deeply_nested_safetensors_header(tmp_path):
    path = tmp_path / "x.safetensors"
    raw = b"[" * 50_000 + b"]" * 50_000
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(BadInput, match="not JSON"):
        read_header(path)


@pytest.mark.parametrize("name", ["list", "null", "layers_string", "architectures_string"])
def test_inspect_survives_a_bad_config(tmp_path, capfd, name):
    folder = _model_with_config(tmp_path, CONFIG_BAD[name][0])
    res = run_cli(["inspect", folder], capfd)
    assert res.code == 2 and "config.json" in one_line(res.err), str(res)


# ============================================================================================= 7. GGUF


def tiny_gguf(path: Path, *, layers: int = 2, hidden: int = 8, inter: int = 16, vocab: int = 16) -> Path:
    """A float32 Llama GGUF written with the gguf package (tied embeddings: no output.weight)."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(32)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def add(name, *shape):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    add("token_embd.weight", vocab, hidden)
    add("output_norm.weight", hidden)
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            add(f"blk.{i}.{name}.weight", hidden, hidden)
        add(f"blk.{i}.ffn_gate.weight", inter, hidden)
        add(f"blk.{i}.ffn_up.weight", inter, hidden)
        add(f"blk.{i}.ffn_down.weight", hidden, inter)
        add(f"blk.{i}.attn_norm.weight", hidden)
        add(f"blk.{i}.ffn_norm.weight", hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_view_matches_the_dequantized_folder_and_writes_nothing(tmp_path, monkeypatch):
    """validate/plan read the GGUF header only: same names, shapes and layer count as the converted folder
    that `run` uses, and nothing written to the cache."""
    from loracook.io.resolve import gguf_to_folder, open_gguf_base

    source = tiny_gguf(tmp_path / "pkg" / "tiny.gguf")
    cache = tmp_path / "cache"
    monkeypatch.setenv("LORACOOK_CACHE", str(cache))
    view = open_gguf_base(source.parent, source.name, dequantize=False)
    assert view.header_only and not cache.exists()
    assert view.copy_files() == []
    with pytest.raises(RuntimeError, match="headers only"):
        view.reader(str(source))
    converted = open_checkpoint(gguf_to_folder(source.parent, source.name))
    assert {n: i.shape for n, i in view.tensors.items()} == {n: i.shape for n, i in converted.tensors.items()}
    assert {i.dtype for i in view.tensors.values()} == {i.dtype for i in converted.tensors.values()}
    assert view.num_layers == converted.num_layers == 2 and view.tied_embeddings == converted.tied_embeddings
    cached = open_gguf_base(source.parent, source.name, dequantize=False)
    assert not cached.header_only  # once converted, the real folder is used


def test_gguf_with_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    from loracook.io.resolve import gguf_to_folder

    source = tmp_path / "pkg" / "tiny.gguf"
    source.parent.mkdir()
    source.write_bytes(b"GGUF")
    (tmp_path / "afile").write_text("not a folder")
    monkeypatch.setenv("LORACOOK_CACHE", str(tmp_path / "afile" / "cache"))
    with pytest.raises(BadInput) as info:
        gguf_to_folder(source.parent, source.name)
    assert "LORACOOK_CACHE" in info.value.one_line()


def test_gguf_that_is_not_a_gguf(tmp_path):
    from loracook.io.checkpoint import gguf_header_checkpoint

    source = tmp_path / "bad.gguf"
    source.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(BadInput, match="GGUF"):
        gguf_header_checkpoint(source)
