"""The CLI's own contract: fast help without torch, the schema check, and readable recipe errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from loracook.cli import main
from loracook.recipe.schema import schema_text


def test_help_does_not_import_torch():
    code = "import sys; from loracook.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def test_validate_does_not_import_torch(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("loracook: 1\nbase: ./b\nsources: {a: ./a}\nmerge: {method: linear}\n")
    code = (
        "import sys; from loracook.cli import main\n"
        f"main(['validate', '--schema-only', {str(recipe)!r}])\nprint('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("False")


def test_committed_schema_is_current(capsys):
    assert main(["schema", "--check"]) == 0


def test_schema_check_fails_when_stale(tmp_path: Path, capsys):
    stale = tmp_path / "recipe.schema.json"
    stale.write_text("{}\n")
    assert main(["schema", "--check", "--path", str(stale)]) == 2
    assert "stale" in capsys.readouterr().err
    assert main(["schema", "--path", str(stale)]) == 0
    assert main(["schema", "--check", "--path", str(stale)]) == 0


def test_schema_lists_each_method_with_its_parameters():
    schema = json.loads(schema_text())
    defs = schema["$defs"]
    assert {"TiesMerge", "SvdMerge", "DareTiesMerge", "LinearMerge"} <= set(defs)
    assert "majority_sign" in defs["TiesMerge"]["properties"]
    assert "majority_sign" not in defs["LinearMerge"]["properties"]
    assert defs["SvdMerge"]["required"] == ["method", "rank"]
    assert defs["TiesMerge"]["additionalProperties"] is False


def test_error_points_to_yaml_line_with_did_you_mean(tmp_path: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "loracook: 1\nbase: ./b\nsources:\n  a: ./a\nmerge:\n  method: linear\n  wieghts: {a: 1}\n"
    )
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert f"{recipe}:7:3" in err and "did you mean 'weights'" in err
