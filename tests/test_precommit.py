"""Recipes in CI: the pre-commit hook (.pre-commit-hooks.yaml) and GitHub annotations (loracook/annotations.py).

The hook is checked twice: its definition against pre-commit's own manifest schema and file patterns (fast),
and end to end with ``pre-commit try-repo`` (slow: pre-commit builds the hook's virtualenv with
``pip install`` of loracook and its dependencies). try-repo runs against a temporary git copy of this
checkout's package files rather than the checkout itself, so that it tests the working tree (try-repo only
sees committed or staged files) and never touches this repository's git state.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures import OFFLINE_ENV, REPO_ROOT, make_llama, make_lora, write_recipe

from loracook.annotations import escape_data, escape_property, github_line, github_lines
from loracook.errors import BadInput

HOOKS = REPO_ROOT / ".pre-commit-hooks.yaml"

# --------------------------------------------------------------------------------------------- annotations


def located(message="unknown key 'wieghts'", fix="did you mean 'weights'?", file=None, line=12, col=5):
    error = BadInput(message, file=file, fix=fix)
    error.line, error.column = line, col
    return error


def test_github_line_has_file_line_col_and_the_fix(tmp_path):
    recipe = tmp_path / "recipes" / "qa-mix.yaml"
    line = github_line(located(file=recipe), root=tmp_path)
    assert (
        line
        == "::error file=recipes/qa-mix.yaml,line=12,col=5::unknown key 'wieghts'; did you mean 'weights'?"
    )


def test_github_escaping_follows_the_runner():
    assert escape_data("100% done\r\nnext") == "100%25 done%0D%0Anext"
    assert escape_property("a:b,c%\n") == "a%3Ab%2Cc%25%0A"
    error = located(
        message="weights: 50% of 'x,y'", fix=None, file="/elsewhere/odd:name,1.yaml", line=3, col=None
    )
    line = github_line(error, root="/work/somewhere")
    assert line == "::error file=/elsewhere/odd%3Aname%2C1.yaml,line=3::weights: 50%25 of 'x,y'"
    assert line.count("::") == 2  # the message's ':' does not need escaping, the properties' do


def test_github_line_without_position_or_file():
    assert github_line(located(line=None, col=None, file="r.yaml"), root=".") == (
        "::error file=r.yaml::unknown key 'wieghts'; did you mean 'weights'?"
    )
    assert github_line(BadInput("no recipes given")) == "::error::no recipes given"
    error = BadInput("multi\nline  message", file="r.yaml", fix="fix\nit")
    assert github_line(error, root=".", level="warning", title="loracook validate") == (
        "::warning file=r.yaml,title=loracook validate::multi line message; fix it"
    )
    with pytest.raises(ValueError):
        github_line(error, level="fatal")
    assert len(github_lines([error, error], root=".")) == 2


# ------------------------------------------------------------------------------------- hook definition


def test_hook_manifest_is_valid_for_pre_commit():
    clientlib = pytest.importorskip("pre_commit.clientlib")
    (hook,) = clientlib.load_manifest(str(HOOKS))
    assert hook["id"] == "loracook-validate" and hook["entry"] == "loracook validate"
    assert hook["language"] == "python" and hook["require_serial"]
    files, exclude = re.compile(hook["files"]), re.compile(hook["exclude"])

    def selected(path):
        return bool(files.search(path)) and not exclude.search(path)

    for path in (
        "recipes/demo.yaml",
        "recipes/skills/merge-ties.yml",
        "sub/recipes/a.yaml",
        "x/mix.recipe.yaml",
    ):
        assert selected(path), path
    for path in (
        "recipes/skills/tasks/kessary.yaml",
        "recipes/data/x.yaml",
        "config.yaml",
        "recipes/readme.md",
    ):
        assert not selected(path), path


def test_every_repository_recipe_is_selected_and_no_task_file():
    """The default patterns fit this repository: all recipes in, all lm-eval task files out."""
    hook = yaml.safe_load(HOOKS.read_text())[0]
    files, exclude = re.compile(hook["files"]), re.compile(hook["exclude"])
    for path in REPO_ROOT.glob("recipes/**/*.y*ml"):
        rel = path.relative_to(REPO_ROOT).as_posix()
        is_recipe = "loracook:" in path.read_text()
        assert (bool(files.search(rel)) and not exclude.search(rel)) == is_recipe, rel


# ----------------------------------------------------------------------------------------- try-repo


def _git(*args, cwd):
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _hook_repo(target: Path) -> Path:
    """A git repository holding what pre-commit needs to install the hook: the package and its metadata."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    target.mkdir()
    for name in ("pyproject.toml", "README.md", ".pre-commit-hooks.yaml"):
        shutil.copy2(REPO_ROOT / name, target / name)
    for name in ("loracook", "schemas"):
        shutil.copytree(REPO_ROOT / name, target / name, ignore=ignore)
    _git("init", "-q", cwd=target)
    _git("add", "-A", cwd=target)
    _git("commit", "-q", "-m", "hook repo", cwd=target)
    return target


def _constraints(tmp_path: Path) -> str:
    """pip constraints for the hook's environment: this environment's torch (a CPU wheel), so that pip does not
    fetch a newer CUDA build, plus whatever constraint file pip is already configured with."""
    import torch

    ours = tmp_path / "constraints.txt"
    ours.write_text(f"torch=={torch.__version__.split('+')[0]}\n")
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.constraint"], capture_output=True, text=True
    ).stdout.strip()
    return " ".join([str(ours), *([configured] if configured else [])])


# Minutes (pre-commit builds the hook's virtualenv, torch included): not in `make test`, run it with
# `pytest -m install tests/test_precommit.py`.
@pytest.mark.install
def test_try_repo_passes_a_good_recipe_and_fails_a_bad_one(tmp_path):
    pre_commit = shutil.which("pre-commit") or str(Path(sys.executable).with_name("pre-commit"))
    if not Path(pre_commit).exists() or shutil.which("git") is None:
        pytest.skip("pre-commit or git not installed")
    hook_repo = _hook_repo(tmp_path / "hook-repo")
    project = tmp_path / "project"
    base = make_llama(project / "models" / "llama", tokenizer=False)
    make_lora(base, project / "adapters" / "facts", seed=1, r=4, target_modules=["q_proj"])
    good = {
        "loracook": 1,
        "base": "../models/llama",
        "sources": {"facts": "../adapters/facts"},
        "merge": {"method": "linear"},
        "output": {"kind": "adapter", "path": "../out/good"},
    }
    write_recipe(project / "recipes", good, "good.yaml")
    bad = yaml.safe_dump({**good, "merge": {"method": "linear", "wieghts": {"facts": 1.0}}}, sort_keys=False)
    write_recipe(project / "recipes", bad, "bad.yaml")
    bad_line = next(i for i, text in enumerate(bad.splitlines(), 1) if "wieghts" in text)
    write_recipe(project / "recipes" / "tasks", "task: not-a-recipe\n", "task.yaml")
    _git("init", "-q", cwd=project)
    _git("add", "-A", cwd=project)
    env = {
        **os.environ,
        **OFFLINE_ENV,
        "PRE_COMMIT_HOME": str(tmp_path / "pre-commit-cache"),
        "PIP_CONSTRAINT": _constraints(tmp_path),
        "PYTHONPATH": "",  # the hook must run the loracook pre-commit installed, not this checkout
    }

    # One call (try-repo builds the hook's environment from scratch each time, minutes): the good recipe
    # passes, the bad one fails with its line, the task file is not a recipe and is not looked at.
    files = ["recipes/good.yaml", "recipes/bad.yaml", "recipes/tasks/task.yaml"]
    result = subprocess.run(
        [pre_commit, "try-repo", str(hook_repo), "loracook-validate", "--verbose", "--files", *files],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "loracook validate" in out and "Failed" in out and "exit code: 2" in out, out
    assert "ok recipes/good.yaml" in out, out
    assert f"recipes/bad.yaml:{bad_line}:" in out and "wieghts" in out, out
    assert "task.yaml" not in out.split("Failed", 1)[1], out
