"""The `evaluate` section of `loracook run` and the `loracook eval` verb, end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import LLAMA_LINEAR, make_llama, make_lora, run_cli, write_recipe

TASKS = Path(__file__).resolve().parent.parent / "recipes" / "tasks"
GOOD_TASK = """task: t
dataset_path: json
dataset_kwargs:
  data_files: {test: data.jsonl}
test_split: test
output_type: multiple_choice
doc_to_text: "{{q}}"
doc_to_choice: ["yes", "no"]
doc_to_target: 0
metric_list:
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("run_eval")
    base = make_llama(root / "base", seed=3, tie_word_embeddings=True, max_position_embeddings=1024)
    a = make_lora(base, root / "a", seed=41, scale=0.3, r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    b = make_lora(
        base, root / "b", seed=42, scale=0.3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    return base, a, b


def recipe(tiny, out: Path, kind: str, evaluate: dict) -> dict:
    base, a, b = tiny
    merge = {"method": "linear", "weights": {"a": 0.5, "b": 0.5}}
    return {
        "loracook": 1,
        "name": "mix",
        "base": str(base),
        "sources": {"a": str(a), "b": str(b)},
        "merge": merge,
        "output": {"kind": kind, "path": str(out)},
        "evaluate": evaluate,
    }


@pytest.mark.parametrize("kind", ["model", "adapter"])
def test_run_evaluates_baselines_and_the_merge(tiny, tmp_path, capfd, kind):
    out = tmp_path / "out"
    evaluate = {
        "tasks": [str(TASKS / "capitals.yaml")],
        "limit": 4,
        "batch_size": 4,
        "baselines": ["base", "a"],
    }
    result = run_cli(["run", write_recipe(tmp_path, recipe(tiny, out, kind, evaluate))], capfd)
    assert result.code == 0, result
    results = json.loads((out / "eval_results.json").read_text())
    names = [c["name"] for c in results["candidates"]]
    assert names == ["base", "a", "mix"]
    assert (out / "eval_results.png").is_file()
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "loracook_capitals" in card
    assert "evaluation" in result.out and "mix" in result.out


def test_no_eval_skips_the_section(tiny, tmp_path, capfd):
    out = tmp_path / "out"
    evaluate = {"tasks": [str(TASKS / "capitals.yaml")], "limit": 2}
    result = run_cli(
        ["run", write_recipe(tmp_path, recipe(tiny, out, "adapter", evaluate)), "--no-eval"], capfd
    )
    assert result.code == 0, result
    assert not (out / "eval_results.json").exists()


def test_eval_verb_on_an_adapter_output(tiny, tmp_path, capfd):
    out = tmp_path / "out"
    evaluate = {"tasks": [str(TASKS / "capitals.yaml")], "limit": 2}
    assert (
        run_cli(
            ["run", write_recipe(tmp_path, recipe(tiny, out, "adapter", evaluate)), "--no-eval"], capfd
        ).code
        == 0
    )
    report = tmp_path / "report"
    result = run_cli(
        [
            "eval",
            out,
            "--base",
            tiny[0],
            "--tasks",
            TASKS / "capitals.yaml",
            "--limit",
            "3",
            "--report-dir",
            report,
        ],
        capfd,
    )
    assert result.code == 0, result
    assert json.loads((report / "eval_results.json").read_text())["candidates"][0]["name"] == "out"


def bad_task_folder(tmp_path: Path, text: str, data: bool = True) -> Path:
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "t.yaml").write_text(text)
    if data:
        (folder / "data.jsonl").write_text('{"q": "is it?"}\n')
    return folder


@pytest.mark.parametrize(
    ("case", "phrase"),
    [
        ("unknown-task", "unknown"),
        ("missing-data", "not found"),
        ("metric-offline", "offline"),
        ("unknown-baseline", "unknown baseline"),
    ],
)
def test_bad_evaluation_inputs_fail_before_merging(tiny, tmp_path, capfd, case, phrase):
    out = tmp_path / "out"
    evaluate: dict = {"tasks": [str(TASKS / "capitals.yaml")], "limit": 2}
    if case == "unknown-task":
        evaluate["tasks"] = ["loracook_no_such_task"]
    elif case == "missing-data":
        evaluate["tasks"] = [str(bad_task_folder(tmp_path, GOOD_TASK, data=False))]
    elif case == "metric-offline":
        evaluate["tasks"] = [
            str(bad_task_folder(tmp_path, GOOD_TASK.replace("metric: acc", "metric: rouge")))
        ]
    else:
        evaluate["baselines"] = ["base", "c"]
    path = write_recipe(tmp_path, recipe(tiny, out, "model", evaluate))
    for command in (["validate", path], ["run", path]):
        result = run_cli(command, capfd)
        assert result.code == 2, result
        assert len(result.err_lines) == 1 and "Traceback" not in result.err
        assert phrase in result.err.lower(), result.err
    assert not out.exists()
