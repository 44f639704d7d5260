"""Evaluation with lm-eval: task resolution and its bad inputs, candidates that share one in-memory base,
the end-to-end runner on the shipped tasks, the report (JSON, table, markdown, PNG), and a no-network proof.

Models are tiny random Llamas (hidden 32, two layers, a character tokenizer) with real PEFT adapters; every
candidate is checked against an independently loaded PEFT model or PEFT's own merge_and_unload.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fixtures import LLAMA_LINEAR, OFFLINE_ENV, make_llama, make_lora, peft_merged_state_dict

from loracook.errors import BadInput
from loracook.evaluation import (
    AdapterWeights,
    EvalEvent,
    EvalOptions,
    EvalReport,
    adapter_candidates,
    adapter_folder_candidate,
    base_candidate,
    check_chat_template,
    evaluate_candidates,
    evaluate_model,
    folder_candidate,
    load_model,
    model_candidate,
    path_candidate,
    resolve_tasks,
)
from loracook.evaluation import tasks as tasks_module

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
SHIPPED = ("loracook_arithmetic", "loracook_capitals", "loracook_sequences", "loracook_vellmark")
PROMPT = "Question: What is the capital of France?\nAnswer: Paris"

# A loglikelihood task: its perplexity is a continuous score, so two candidates share it only when they
# compute the same function (accuracy on a few items could agree by chance).
PERPLEXITY_TASK = """\
task: tiny_perplexity
dataset_path: json
dataset_kwargs:
  data_files: {test: data.jsonl}
test_split: test
output_type: loglikelihood
doc_to_text: "{{q}}"
doc_to_target: " {{a}}"
metric_list:
  - {metric: perplexity, aggregation: perplexity, higher_is_better: false}
  - {metric: acc, aggregation: mean, higher_is_better: true}
"""


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """See conftest.one_thread."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tied tiny Llama (the SmolLM2 layout) with room for few-shot prompts, and four real adapters."""
    root = tmp_path_factory.mktemp("eval_zoo")
    base = make_llama(root / "base", seed=3, tie_word_embeddings=True, max_position_embeddings=1024)
    adapters = {
        "a": make_lora(base, root / "ad_a", seed=31, scale=0.3, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR),
        "b": make_lora(base, root / "ad_b", seed=32, scale=0.3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        # embedding LoRA on a tied base: re-tying the head to a LoRA-wrapped embedding would break it
        "emb": make_lora(base, root / "ad_emb", seed=33, scale=0.3, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        # LoRA on the tied output head: lm-eval's tie_weights() call would raise on it
        "head": make_lora(base, root / "ad_head", seed=34, scale=0.3, r=4, lora_alpha=8, target_modules=["lm_head", "v_proj"]),
    }  # fmt: skip
    return base, adapters


@pytest.fixture(scope="module")
def loaded(tiny):
    return load_model(tiny[0])


@pytest.fixture(scope="module")
def shipped():
    return resolve_tasks(["tasks/"], RECIPES)


@pytest.fixture(scope="module")
def perplexity_task(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppl_task")
    (folder / "task.yaml").write_text(PERPLEXITY_TASK)
    rows = [{"q": f"{a} + {b} =", "a": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1), (6, 3)]]
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder / "task.yaml"


def logits(model, tokenizer, text: str = PROMPT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def fresh_peft(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    ).eval()


# ---------------------------------------------------------------------------------------------- resolving


def test_resolve_folder_file_and_local_name(monkeypatch):
    monkeypatch.setattr(tasks_module, "_builtin_manager", lambda: pytest.fail("built the 14k-task index"))
    by_folder = resolve_tasks(["./tasks"], RECIPES, load=False)
    assert by_folder.names == SHIPPED
    assert not by_folder.needs_builtin_index
    mixed = resolve_tasks(["tasks/sequences.yaml", "tasks/", "loracook_capitals"], RECIPES)
    assert mixed.names == (
        "loracook_sequences",
        "loracook_arithmetic",
        "loracook_capitals",
        "loracook_vellmark",
    )
    capitals = {t.name: t for t in mixed.tasks}["loracook_capitals"]
    assert capitals.file == RECIPES / "tasks" / "capitals.yaml"
    assert (capitals.output_type, capitals.metrics) == ("multiple_choice", ("acc", "acc_norm"))


def test_data_files_resolve_against_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    shutil.copytree(RECIPES / "tasks", tmp_path / "recipe" / "my_tasks")
    monkeypatch.chdir(tmp_path)  # lm-eval alone would look for data/*.jsonl here
    resolved = resolve_tasks(["my_tasks/sequences.yaml"], tmp_path / "recipe")
    spec = resolved.tasks[0].lm_eval_spec()
    files = spec["dataset_kwargs"]["data_files"]
    assert files == {
        "test": str(tmp_path / "recipe" / "my_tasks" / "data" / "sequences.jsonl"),
        "fewshot": str(tmp_path / "recipe" / "my_tasks" / "data" / "sequences_fewshot.jsonl"),
    }
    assert resolved.tasks[0].lm_eval_spec() is not resolved.tasks[0].lm_eval_spec()  # lm-eval mutates it


def test_builtin_names_need_local_data_and_unknown_names_fail():
    """The real 14k-task index (built once, seconds): known names without cached hub data are refused too."""
    with pytest.raises(BadInput) as unknown:
        resolve_tasks(["./tasks/", "hellaswagg"], RECIPES, load=False)
    assert "unknown task 'hellaswagg'" in unknown.value.message and "hellaswag" in unknown.value.fix
    assert unknown.value.loc == ("evaluate", "tasks", 1)
    with pytest.raises(BadInput) as offline:
        resolve_tasks(["hellaswag"], RECIPES)
    assert "needs the hub dataset 'Rowan/hellaswag'" in offline.value.message
    assert "not available offline" in offline.value.message


def write_task(folder: Path, text: str, *, data: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if data:
        (folder / "data.jsonl").write_text('{"q": "1 + 1 =", "a": "2"}\n{"q": "2 + 2 =", "a": "4"}\n')
    (folder / "t.yaml").write_text(text)
    return folder / "t.yaml"


GOOD = PERPLEXITY_TASK.replace("tiny_perplexity", "t")
BAD_TASKS = {
    "missing data file": (GOOD.replace("data.jsonl", "nope/missing.jsonl"), "data file 'nope/missing.jsonl' not found"),
    "metric not offline": (GOOD.replace("metric: acc,", "metric: rouge,"), "metric 'rouge' is not available offline"),
    "hf_evaluate metric": (GOOD.replace("metric: acc,", "metric: acc, hf_evaluate: true,"), "does not work offline"),
    "malformed yaml": (GOOD + "doc_to_text: [unclosed\n", "malformed task YAML"),
    "no task name": (GOOD.replace("task: t\n", ""), "it has no `task:` name"),
    "unknown key": (GOOD.replace("doc_to_text", "doc_to_txt"), "unknown key 'doc_to_txt'"),
    "split not in data": (GOOD.replace("test_split: test", "test_split: validation"), "test_split 'validation' is not among"),
    "bad output type": (GOOD.replace("output_type: loglikelihood", "output_type: choice"), "unknown output_type 'choice'"),
    "unknown aggregation": (GOOD.replace("aggregation: mean", "aggregation: average"), "unknown aggregation 'average'"),
    "no data_files": (GOOD.replace("  data_files: {test: data.jsonl}\n", "  {}\n"), "gives no data_files"),
    "hub dataset": (GOOD.replace("dataset_path: json", "dataset_path: someone/some_dataset"), "needs the hub dataset 'someone/some_dataset'"),
    "bad template": (GOOD.replace('"{{q}}"', '"{{q}"'), "task 't' cannot be loaded"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_TASKS))
def test_bad_task_files_are_one_line_bad_input(case, tmp_path):
    text, expected = BAD_TASKS[case]
    path = write_task(tmp_path / "tasks", text)
    with pytest.raises(BadInput) as error:
        resolve_tasks(["tasks/t.yaml"], tmp_path)
    line = error.value.one_line()
    assert expected in line and "\n" not in line
    assert error.value.file == str(path)


def test_includes_templates_groups_and_local_function_metrics(tmp_path):
    """lm-eval's own YAML features work: `include:` (a template without `task:` in a folder is skipped, and so
    is a group file: its tasks are in the folder) and a metric given as a local `!function` (no download)."""
    folder = tmp_path / "tasks"
    write_task(folder, "")
    (folder / "_template.yaml").write_text(
        "dataset_path: json\ndataset_kwargs: {data_files: {test: data.jsonl}}\ntest_split: test\n"
        'output_type: loglikelihood\ndoc_to_text: "{{q}}"\ndoc_to_target: " {{a}}"\n'
    )
    (folder / "group.yaml").write_text("group: my_group\ntask: [t]\n")
    (folder / "utils.py").write_text("def my_metric(items):\n    return 1.0\n")
    (folder / "t.yaml").write_text(
        "include: _template.yaml\ntask: t\nmetric_list:\n"
        "  - {metric: !function utils.my_metric, aggregation: mean, higher_is_better: true}\n"
    )
    resolved = resolve_tasks(["tasks"], tmp_path)
    assert resolved.names == ("t",) and resolved.tasks[0].metrics == ("my_metric",)
    data_files = resolved.tasks[0].lm_eval_spec()["dataset_kwargs"]["data_files"]
    assert data_files == {"test": str(folder / "data.jsonl")}
    with pytest.raises(BadInput, match="task groups are not supported"):
        resolve_tasks(["tasks/group.yaml"], tmp_path)


def test_missing_file_and_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no task YAML"):
        resolve_tasks(["empty"], tmp_path)
    with pytest.raises(BadInput, match="task file 'tasks/nope.yaml' not found") as error:
        resolve_tasks(["./tasks/", "tasks/nope.yaml"], RECIPES)
    assert error.value.loc == ("evaluate", "tasks", 1)


def test_a_good_task_file_passes(tmp_path):
    write_task(tmp_path / "tasks", GOOD)
    resolved = resolve_tasks(["tasks"], tmp_path)
    assert resolved.names == ("t",) and resolved.tasks[0].metrics == ("perplexity", "acc")


# --------------------------------------------------------------------------------------------- candidates


def test_adapter_candidates_apply_exactly_one_adapter_and_restore_the_base(tiny, loaded):
    base_dir, adapters = tiny
    before_state = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    before = logits(loaded.model, loaded.tokenizer)
    candidates = adapter_candidates(loaded, adapters)
    assert [c.name for c in candidates] == ["a", "b", "emb", "head"]
    assert {c.kind for c in candidates} == {"adapter"}
    for candidate in candidates:
        expected = logits(fresh_peft(base_dir, adapters[candidate.name]), loaded.tokenizer)
        with candidate.open() as (model, tokenizer):
            got = logits(model, tokenizer)
        assert not torch.allclose(expected, before, atol=1e-4), "the adapter should change the output"
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        # the base is back: same modules, same tensors, same outputs
        assert not any("lora" in name for name, _ in loaded.model.named_modules())
        assert not hasattr(loaded.model, "peft_config")
        torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), before, rtol=0, atol=0)
    after_state = loaded.model.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())


def test_in_memory_adapter_weights_match_the_folder(tiny, loaded):
    from safetensors.torch import load_file

    base_dir, adapters = tiny
    folder = adapters["a"]
    weights = AdapterWeights(
        json.loads((folder / "adapter_config.json").read_text()),
        load_file(folder / "adapter_model.safetensors"),
    )
    (from_folder,) = adapter_candidates(loaded, {"a": folder})
    (in_memory,) = adapter_candidates(loaded, {"a": weights})
    with from_folder.open() as (model, tokenizer):
        expected = logits(model, tokenizer)
    with in_memory.open() as (model, tokenizer):
        torch.testing.assert_close(logits(model, tokenizer), expected, rtol=0, atol=0)
    assert in_memory.source == "in memory"


def test_merged_state_dict_is_swapped_in_and_out(tiny, loaded):
    base_dir, adapters = tiny
    merged = peft_merged_state_dict(base_dir, adapters["a"])
    before = logits(loaded.model, loaded.tokenizer)
    expected = logits(fresh_peft(base_dir, adapters["a"]).merge_and_unload(), loaded.tokenizer)
    with model_candidate("merged", merged, base=loaded).open() as (model, tokenizer):
        assert model is loaded.model  # no copy of the base
        torch.testing.assert_close(logits(model, tokenizer), expected, rtol=1e-5, atol=1e-5)
        assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    torch.testing.assert_close(logits(loaded.model, loaded.tokenizer), before, rtol=0, atol=0)
    with pytest.raises(KeyError, match="lacks"):
        with model_candidate("bad", {"nope.weight": torch.zeros(1)}, base=loaded).open():
            pass


def test_path_candidate_tells_models_from_adapters(tiny, tmp_path):
    base_dir, adapters = tiny
    assert path_candidate(base_dir).kind == "model"
    adapter = path_candidate(adapters["b"], name="b")  # the base comes from adapter_config.json
    assert (adapter.kind, adapter.name) == ("adapter", "b")
    with pytest.raises(BadInput, match="not a model or adapter folder"):
        path_candidate(tmp_path)


# ---------------------------------------------------------------------------------------------- end to end


def test_evaluate_base_sources_and_both_output_kinds(tiny, loaded, shipped, perplexity_task, tmp_path):
    """One call scores the base, each adapter alone, a merged model (in memory and as a folder) and a merged
    adapter output; candidates computing the same function get the same scores."""
    base_dir, adapters = tiny
    merged_state = peft_merged_state_dict(base_dir, adapters["a"])
    merged_dir = tmp_path / "merged_model"
    fresh_peft(base_dir, adapters["a"]).merge_and_unload().save_pretrained(merged_dir)
    loaded.tokenizer.save_pretrained(merged_dir)
    tasks = resolve_tasks([str(perplexity_task), "./tasks/"], RECIPES)
    candidates = [
        base_candidate(loaded),
        *adapter_candidates(loaded, {name: adapters[name] for name in ("a", "emb", "head")}),
        model_candidate("merged", merged_state, base=loaded),  # output kind "model", in memory
        folder_candidate(merged_dir, name="merged_folder"),  # the same, read back from disk
        adapter_folder_candidate(adapters["a"], base_dir, name="adapter_output"),  # output kind "adapter"
    ]
    events: list[EvalEvent] = []
    options = EvalOptions(limit=4, batch_size=4, bootstrap_iters=50)
    report = evaluate_candidates(candidates, tasks, options, on_event=events.append)

    names = ["base", "a", "emb", "head", "merged", "merged_folder", "adapter_output"]
    assert [(e.kind, e.candidate) for e in events] == [(k, n) for n in names for k in ("start", "done")]
    assert report.candidate_names == names
    assert [t.name for t in report.tasks] == ["tiny_perplexity", *SHIPPED]
    assert [(r.task, r.metric_label) for r in report.rows] == [
        ("tiny_perplexity", "perplexity"),
        ("tiny_perplexity", "acc"),
        ("loracook_arithmetic", "acc"),
        ("loracook_capitals", "acc"),
        ("loracook_capitals", "acc_norm"),
        ("loracook_sequences", "exact_match (strip)"),
        ("loracook_vellmark", "acc"),
    ]
    for row in report.rows:
        assert set(row.scores) == set(names)
    ppl = {n: report.score("tiny_perplexity", "perplexity", n).value for n in names}
    assert len({round(ppl[n], 6) for n in ("base", "a", "emb", "head")}) == 4, (
        ppl
    )  # each evaluated its own adapter
    for same in ("merged", "merged_folder", "adapter_output"):
        assert ppl[same] == pytest.approx(ppl["a"], rel=1e-4)
    assert ppl["base"] == pytest.approx(report.score("tiny_perplexity", "perplexity", "base").value)
    for task in report.tasks:
        assert task.samples == 4 and task.file is not None
    assert {t.name: t.num_fewshot for t in report.tasks}["loracook_sequences"] == 3  # the task's own default

    # eval_results.json: stable, documented structure, and a lossless round trip
    path = report.save(tmp_path / "out" / "eval_results.json")
    data = json.loads(path.read_text())
    assert list(data) == [
        "schema", "schema_version", "created", "lm_eval_version", "wall_seconds", "options", "candidates", "tasks",
        "results",
    ]  # fmt: skip
    assert (data["schema"], data["schema_version"]) == ("loracook/eval_results", 1)
    assert data["options"] == {
        "limit": 4, "num_fewshot": None, "batch_size": 4, "device": "cpu", "apply_chat_template": False,
        "seed": 0, "bootstrap_iters": 50,
    }  # fmt: skip
    assert list(data["candidates"][0]) == ["name", "kind", "source", "seconds", "eval_seconds"]
    assert [c["kind"] for c in data["candidates"]] == [
        "base",
        "adapter",
        "adapter",
        "adapter",
        "model",
        "model",
        "adapter",
    ]
    assert list(data["tasks"][0]) == ["name", "file", "output_type", "num_fewshot", "samples", "total"]
    first = data["results"][0]
    assert list(first) == ["task", "metric", "filter", "higher_is_better", "scores"]
    assert first["higher_is_better"] is False and list(first["scores"]) == names
    assert set(first["scores"]["base"]) == {"value", "stderr"}
    assert EvalReport.load(path).to_dict() == data

    # table rows, markdown and chart
    header, rows = report.table()
    assert header == ["task", "metric", "n", *names] and len(rows) == len(report.rows)
    assert all(" ± " in cell or cell == "n/a" for row in rows for cell in row[3:])
    markdown = report.markdown()
    assert markdown.splitlines()[0] == "| " + " | ".join(header) + " |"
    assert len([line for line in markdown.splitlines() if line.startswith("|")]) == len(rows) + 2
    assert "**" in markdown  # the best value of a row is bold
    png = report.plot(tmp_path / "out" / "eval_results.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_no_network_during_task_resolution_and_evaluation(tiny, monkeypatch, tmp_path):
    """Offline variables set and every socket connect refused: resolving the shipped tasks and evaluating a
    model loaded from disk still works."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during evaluation")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    tasks = resolve_tasks(["tasks"], RECIPES)
    report = evaluate_candidates([folder_candidate(tiny[0], name="tiny")], tasks, EvalOptions(limit=3))
    hub_task = write_task(tmp_path, GOOD.replace("dataset_path: json", "dataset_path: someone/some_dataset"))
    with pytest.raises(BadInput, match="not available offline"):  # refused without trying the hub
        resolve_tasks([str(hub_task)], tmp_path)
    assert attempts == []
    assert [r.task for r in report.rows] == ["loracook_arithmetic", "loracook_capitals", "loracook_capitals", "loracook_sequences", "loracook_vellmark"]  # fmt: skip
    assert all(r.scores["tiny"].value is not None for r in report.rows)


# ------------------------------------------------------------------------------------------------ details


def test_chat_template_required_when_asked(tiny, loaded, shipped, tmp_path):
    with pytest.raises(BadInput, match="has no chat template"):
        evaluate_model(loaded.model, loaded.tokenizer, shipped, EvalOptions(apply_chat_template=True))
    with pytest.raises(BadInput, match="has no chat template") as early:  # the cheap check, before merging
        check_chat_template(tiny[0])
    assert early.value.loc == ("evaluate", "apply_chat_template")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    check_chat_template(tmp_path)


def test_options_from_the_recipe_section():
    from loracook.recipe.model import Evaluate

    section = Evaluate(tasks=["./tasks/"], limit=20, num_fewshot=1, batch_size=4, apply_chat_template=True)
    options = EvalOptions.from_section(section, seed=7)
    assert options == EvalOptions(
        limit=20, num_fewshot=1, batch_size=4, device="cpu", apply_chat_template=True, seed=7
    )
    assert EvalOptions.from_section(section, device="cuda").device == "cuda"


def test_report_rejects_other_documents(tmp_path):
    (tmp_path / "x.json").write_text('{"schema": "something else"}')
    with pytest.raises(BadInput, match="cannot read evaluation results"):
        EvalReport.load(tmp_path / "x.json")


def test_importing_the_package_stays_light():
    code = "import sys, loracook.evaluation; print(sorted(m for m in ('torch', 'lm_eval', 'matplotlib') if m in sys.modules))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout
    assert out.strip() == "[]"
