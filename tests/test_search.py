"""The `search:` section: exact candidates, reproducible and resumable studies, local workers, bad inputs.

Candidates are checked against what `loracook run` writes with the same weights (a model loaded by
transformers from the written folder), never against the search's own numbers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import OFFLINE_ENV, REPO_ROOT, read_tensors, run_cli, write_recipe

EXAMPLES = [{"input": f"Q: what is {i} plus {i}? A:", "output": f" {2 * i}"} for i in range(12)] + [
    {"input": "Say hi in capitals:", "output": " HI THERE"},
    {"input": "The sky is", "output": " blue."},
]


def examples_file(folder: Path, rows=EXAMPLES, name: str = "dev.jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def search_recipe(
    folder: Path, base: Path, sources: dict, *, method="linear", search=None, merge=None, output=None
):
    recipe = {
        "loracook": 1,
        "base": str(base),
        "sources": {k: str(v) for k, v in sources.items()},
        "merge": {"method": method, **(merge or {})},
        "output": {"kind": "model", "path": "./out", "dtype": "float32", **(output or {})},
        "search": {
            "objective": {"examples": str(examples_file(folder))},
            "budget": 4,
            "sampler": "random",
            **(search or {}),
        },
    }
    return write_recipe(folder, recipe)


def trials(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "search" / "trials.jsonl").read_text().splitlines()]


def batch_logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 17, 33, 60, 90, 4], [1, 70, 71, 72, 2, 8, 8, 9]])
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def candidate(recipe_path: Path, params: dict):
    """The search's resident model set to ``params`` (as a trial would), through the public pieces."""
    from loracook.engine import prepare
    from loracook.plan.compile import recipe_values
    from loracook.recipe import load_recipe
    from loracook.search.objectives import check_objective
    from loracook.search.scorer import open_scorer
    from loracook.search.space import Space

    recipe = load_recipe(recipe_path).recipe
    prepared = prepare(recipe, read_tensors=True)
    plan = prepared.plan
    space = Space.from_recipe(recipe, plan.num_layers, plan.combine.method)
    scorer = open_scorer(plan, prepared.sources, check_objective(recipe.search.objective), False)
    point = space.point(params)
    scorer.apply(point.values(plan.num_layers, recipe_values(recipe, plan.base).densities))
    return scorer, point


def plain_run(folder: Path, recipe_path: Path, weights: dict, densities: dict | None, capfd) -> Path:
    """`loracook run` of the same recipe without its search, with the given weights."""
    data = yaml.safe_load(recipe_path.read_text())
    data.pop("search")
    data["merge"]["weights"] = weights
    if densities:
        data["merge"]["density"] = densities
    data["output"]["path"] = str(folder / "out")
    res = run_cli(["run", write_recipe(folder, data)], capfd)
    assert res.code == 0, str(res)
    return folder / "out"


# ------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "base, sources, space, params",
    [
        ("llama", ["a", "b"], {"per": "source"}, {"w.a": 0.7, "w.b": -1.2}),
        (
            "llama_tied",
            ["tied", "tied_embed"],
            {"per": "layer_group", "layer_groups": 2},
            {"w.tied.g0": 1.3, "w.tied.g1": -0.4, "w.tied_embed.g0": 0.6, "w.tied_embed.g1": 1.1},
        ),
    ],
)
def test_linear_candidate_equals_the_run_output(
    zoo, tmp_path, capfd, one_thread, base, sources, space, params
):
    recipe = search_recipe(
        tmp_path / "s", zoo.models[base], {s: zoo.adapters[s] for s in sources}, search={"space": space}
    )
    scorer, point = candidate(recipe, params)
    assert scorer.how == "mixture"
    got = batch_logits(scorer.model)
    out = plain_run(tmp_path / "run", recipe, dict(point.weights), None, capfd)
    expected = batch_logits(load(out))
    assert (got - expected).abs().max().item() <= 1e-4
    scorer.close()
    assert (batch_logits(scorer.model) - batch_logits(load(zoo.models[base]))).abs().max().item() == 0


def test_ties_candidate_equals_the_run_tensors(zoo, tmp_path, capfd, one_thread):
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources, method="ties",
        merge={"density": 0.5}, search={"space": {"density": [0.2, 0.9]}},
    )  # fmt: skip
    scorer, point = candidate(recipe, {"w.a": 0.8, "w.b": 1.4, "d.a": 0.3, "d.b": 0.7})
    assert scorer.how == "executed"
    out = plain_run(tmp_path / "run", recipe, dict(point.weights), dict(point.densities), capfd)
    written = read_tensors(out)
    resident = dict(scorer.model.named_parameters())
    changed = [
        name for name in written if not torch.equal(written[name], read_tensors(zoo.models["llama"])[name])
    ]
    assert changed
    for name, tensor in written.items():
        assert torch.equal(resident[name].detach(), tensor), name


def test_ties_adapter_candidate_is_what_peft_loads_from_the_run(zoo, tmp_path, capfd, one_thread):
    """An adapter output recompressed to merge.rank: the candidate is the base plus the written factors, so its
    logits equal PEFT's forward with the adapter that `loracook run` writes."""
    from peft import PeftModel

    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources, method="ties",
        merge={"density": 0.5, "rank": 6}, output={"kind": "adapter"},
    )  # fmt: skip
    scorer, point = candidate(recipe, {"w.a": 1.2, "w.b": 0.6})
    assert scorer.how == "executed"
    out = plain_run(tmp_path / "run", recipe, dict(point.weights), None, capfd)
    peft = PeftModel.from_pretrained(load(zoo.models["llama"]), out).eval()
    assert (batch_logits(scorer.model) - batch_logits(peft)).abs().max().item() <= 1e-4


# ------------------------------------------------------------------------------------------ end to end


def test_search_writes_best_yaml_that_reproduces_the_output(zoo, tmp_path, capfd, one_thread):
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources,
        merge={"weights": {"a": 0.5, "b": 2.0}}, search={"sampler": "tpe", "budget": 5},
    )  # fmt: skip
    res = run_cli(["run", recipe], capfd)
    assert res.code == 0, str(res)
    out = tmp_path / "s" / "out"
    rows = trials(out)
    assert [r["number"] for r in rows] == list(range(5)) and {r["state"] for r in rows} == {"COMPLETE"}
    assert rows[0]["params"] == {"w.a": 1.0, "w.b": 1.0} and rows[1]["params"] == {"w.a": 0.5, "w.b": 1.5}
    summary = json.loads((out / "search" / "summary.json").read_text())
    best = min(rows, key=lambda r: (r["values"][0], r["number"]))
    assert summary["chosen"]["number"] == best["number"]
    assert (out / "search" / "search.png").stat().st_size > 0
    assert "## Search" in (out / "README.md").read_text()
    assert not (tmp_path / "s" / ".out.search").exists()  # the study moved into <output>/search/
    best_yaml = out / "search" / "best.yaml"
    assert "search" not in yaml.safe_load(best_yaml.read_text())
    res = run_cli(["run", best_yaml, "--output", tmp_path / "again"], capfd)
    assert res.code == 0, str(res)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name


def test_same_seed_one_worker_gives_the_same_trials(zoo, tmp_path, capfd, one_thread):
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(tmp_path / "s", zoo.models["llama"], sources, search={"sampler": "tpe", "seed": 3})
    runs = []
    for name in ("one", "two"):
        res = run_cli(["run", recipe, "--output", tmp_path / name], capfd)
        assert res.code == 0, str(res)
        runs.append([(r["params"], r["values"]) for r in trials(tmp_path / name)])
    assert runs[0] == runs[1]


def _complete(journal: Path) -> int:
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    try:
        study = optuna.load_study(study_name="loracook-search", storage=storage)
    except KeyError:
        return 0
    return len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


def test_sigint_then_resume_finishes_exactly_the_budget(zoo, tmp_path, capfd, one_thread):
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    budget = 100
    recipe = search_recipe(tmp_path / "s", zoo.models["llama"], sources, search={"budget": budget})
    proc, journal = _search_until(recipe, tmp_path / "s", trials_done=3, seconds=120)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    stopped = _complete(journal)
    assert 3 <= stopped < budget
    _resume_finishes_the_budget(recipe, tmp_path / "s" / "out", budget, capfd)


def _search_until(recipe: Path, folder: Path, *, trials_done: int, seconds: float):
    """Start `loracook run RECIPE` (a search writing to FOLDER/out) in a subprocess, in a process group of its
    own; return it and its journal once ``trials_done`` trials are complete (or the process ended, or
    ``seconds`` passed)."""
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loracook", "run", str(recipe)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    journal = folder / ".out.search" / "journal.log"
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None:
        if journal.is_file() and _complete(journal) >= trials_done:
            break
        time.sleep(0.1)
    return proc, journal


def _resume_finishes_the_budget(recipe: Path, out: Path, budget: int, capfd) -> None:
    """`--resume` ends with exactly ``budget`` finished trials and no trial number twice."""
    res = run_cli(["run", recipe, "--resume"], capfd)
    assert res.code == 0, str(res)
    rows = trials(out)
    numbers = [r["number"] for r in rows]
    assert len(numbers) == len(set(numbers))
    assert sum(r["state"] == "COMPLETE" for r in rows) == budget


def test_sigterm_with_two_workers_stops_them_all_and_resumes(zoo, tmp_path, capfd, one_thread):
    """SIGTERM (kill, Slurm, timeout) stops the whole search: the main process and its local workers end within a
    trial, nothing is left running, the temporary output is gone, and --resume finishes the budget."""
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    budget = 200
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources, search={"budget": budget, "workers": 2}
    )
    proc, journal = _search_until(recipe, tmp_path / "s", trials_done=4, seconds=180)
    children = _children(proc.pid)
    assert children, "the search should run a second worker process"
    proc.send_signal(signal.SIGTERM)
    _stopped_whole(proc, children, tmp_path / "s")
    assert not [p for p in (tmp_path / "s").iterdir() if ".loracook-work-" in p.name]
    stopped = _complete(journal)
    assert 4 <= stopped < budget
    _resume_finishes_the_budget(recipe, tmp_path / "s" / "out", budget, capfd)


def test_sigterm_to_the_process_group_fails_every_running_trial(zoo, tmp_path, one_thread):
    """`timeout` and Slurm signal the whole process group: each local worker then fails its own running trial and
    exits, so the journal is left with no trial RUNNING (a worker killed outright would leave one, holding a place
    in the budget until --resume finds its pid dead)."""
    import optuna
    from optuna.trial import TrialState

    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources, search={"budget": 100000, "workers": 2}
    )
    proc, journal = _search_until(recipe, tmp_path / "s", trials_done=1, seconds=180)
    children = _children(proc.pid)
    assert children, "the search should run a second worker process"
    deadline = time.time() + 180  # until the worker is in its trial loop (it has asked twice), not loading
    while proc.poll() is None and time.time() < deadline:
        if any(journal.read_text().count(f':{pid}"') >= 2 for pid in children):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _stopped_whole(proc, children, tmp_path / "s")
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="loracook-search", storage=storage).trials
    assert any(t.user_attrs.get("worker", "").endswith(f":{pid}") for t in trials for pid in children)
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]


def _stopped_whole(proc, children: list[int], folder: Path) -> None:
    """The search ended on SIGTERM: exit 143 with no traceback, no worker left, no output written."""
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    deadline = time.time() + 30
    while time.time() < deadline and any(_alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if _alive(pid)], "a search worker outlived the search"
    assert not (folder / "out").exists()


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_local_workers_finish_the_budget_once(zoo, tmp_path, capfd, one_thread):
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    budget = 30
    recipe = search_recipe(
        tmp_path / "s", zoo.models["llama"], sources, search={"budget": budget, "workers": 2}
    )
    res = run_cli(["run", recipe], capfd)
    assert res.code == 0, str(res)
    rows = trials(tmp_path / "s" / "out")
    assert sorted(r["number"] for r in rows) == list(range(budget))
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert 1 <= len({r["worker"] for r in rows}) <= 2


# -------------------------------------------------------------------------------------------- bad inputs


def _task(folder: Path) -> Path:
    data = folder / "items.jsonl"
    data.write_text('{"q": "2+2=", "a": "4"}\n')
    task = folder / "task.yaml"
    task.write_text(
        "task: tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: items.jsonl\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: '{{q}}'\ndoc_to_target: '{{a}}'\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return task


BAD = {
    "examples missing": ({"objective": {"examples": "nope.jsonl"}}, "examples file not found"),
    "examples empty": ({"objective": {"examples": "EMPTY"}}, "no examples"),
    "examples malformed": ({"objective": {"examples": "BROKEN"}}, "BROKEN_LINE"),
    "bounds reversed": ({"space": {"weights": [1.0, -1.0]}}, "reversed"),
    "budget zero": ({"budget": 0}, "search.budget"),
    "density bounds": ({"space": {"density": [0.0, 1.0]}}, "(0, 1]"),
    "layer groups": ({"space": {"per": "layer_group", "layer_groups": 3}}, "layer_groups is 3"),
    "test split": ({"objective": {"tasks": ["TASK"], "split": "test"}}, "test split"),
    "storage": ({"storage": "sqlite:////no/such/folder/study.db"}, "cannot open the study storage"),
    "workers zero": ({"workers": 0}, "search.workers"),
    "select unknown": ({"select": "best"}, "'worst', 'mean' or 'improve'"),
    "resume without study": ({}, "no search to resume"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_search_input_is_one_line(zoo, tmp_path, capfd, case):
    search, expected = BAD[case]
    folder = tmp_path / "s"
    search = json.loads(json.dumps(search))
    objective = search.get("objective", {})
    if objective.get("examples") == "nope.jsonl":
        objective["examples"] = str(folder / "nope.jsonl")
    if objective.get("examples") == "EMPTY":
        objective["examples"] = str(examples_file(folder, [], "empty.jsonl"))
    if objective.get("examples") == "BROKEN":
        path = examples_file(folder, EXAMPLES[:2], "broken.jsonl")
        path.write_text(path.read_text() + "{not json\n")
        objective["examples"], expected = str(path), f"{path}:3:"
    if objective.get("tasks") == ["TASK"]:
        folder.mkdir(parents=True, exist_ok=True)
        objective["tasks"] = [str(_task(folder))]
    ties = "density" in case
    recipe = search_recipe(
        folder, zoo.models["llama"], {"a": zoo.adapters["a"]}, method="ties" if ties else "linear",
        merge={"density": 0.5} if ties else None, search=search,
    )  # fmt: skip
    args = ["run", recipe] + (["--resume"] if case == "resume without study" else [])
    res = run_cli(args, capfd)
    assert res.code == 2, str(res)
    assert len(res.err_lines) == 1 and "Traceback" not in res.err, str(res)
    assert expected in res.err_lines[0], str(res)
    assert not (folder / "out").exists() and not (folder / ".out.search").exists()


def test_search_worker_needs_a_running_study(zoo, tmp_path, capfd):
    recipe = search_recipe(tmp_path / "s", zoo.models["llama"], {"a": zoo.adapters["a"]})
    res = run_cli(["search-worker", recipe], capfd)
    assert res.code == 2 and len(res.err_lines) == 1, str(res)
    assert "no running search study" in res.err
    assert not (tmp_path / "s" / ".out.search").exists()


def _gain(values: list[float], starts: list[list[float]]) -> float:
    """select: improve written out: min(mean - M0, worst - W0), M0 / W0 the starting points' best mean / worst."""
    mean = sum(values) / len(values)
    best_mean = max(sum(v) / len(v) for v in starts)
    best_worst = max(min(v) for v in starts)
    return min(mean - best_mean, min(values) - best_worst)


@pytest.mark.parametrize(
    ("sampler", "rule"), [("nsga2", "worst"), ("tpe", "worst"), ("cmaes", "worst"), ("tpe", "improve")]
)
def test_tasks_objectives_on_a_dev_split_pick_the_best_worst_task(
    zoo, tmp_path, capfd, one_thread, sampler, rule
):
    """Two lm-eval tasks scored on their `validation` split (never `test`): two objectives, and the written trial
    is the one whose worse task score (minus the L1 term) is highest. nsga2 searches the Pareto front of the two;
    tpe and cmaes optimise that worse score itself (plus 0.01 of the mean), a study of one objective. With
    `select: improve` the study's value is the gain over the starting points finished so far."""
    import optuna

    folder = tmp_path / "s"
    folder.mkdir()
    items = "".join(
        json.dumps({"q": f"{i}+{i}=", "choices": [str(2 * i), str(2 * i + 1)], "a": i % 2}) + "\n"
        for i in range(4)
    )
    (folder / "task_dev.jsonl").write_text(items)
    (folder / "test.jsonl").write_text("not even json\n")  # the search must never read it
    tasks = []
    for name in ("one", "two"):
        (folder / f"{name}.yaml").write_text(
            f"task: tiny_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: test.jsonl\n"
            "    validation: task_dev.jsonl\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
            "doc_to_choice: choices\ndoc_to_target: a\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
            "    higher_is_better: true\n"
        )
        tasks.append(str(folder / f"{name}.yaml"))
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    search = {
        "objective": {"tasks": tasks, "limit": 4},
        "sampler": sampler,
        "budget": 3,
        "l1": 0.01,
        "select": rule,
    }
    recipe = search_recipe(folder, zoo.models["llama"], sources, search=search)
    res = run_cli(["run", recipe], capfd)
    assert res.code == 0, str(res)
    out = folder / "out"
    rows = trials(out)
    summary = json.loads((out / "search" / "summary.json").read_text())
    assert summary["directions"] == ["maximize", "maximize"] and summary["select"] == rule
    for row in rows:
        penalty = 0.01 * sum(abs(v) for v in row["params"].values()) / 2
        assert row["values"] == pytest.approx(
            [row["objectives"][f"tiny_{n}"] - penalty for n in ("one", "two")]
        )
    starts = [r["values"] for r in rows if r.get("start")]
    assert rows[0]["start"] == "all weights 1"
    score = (lambda r: _gain(r["values"], starts)) if rule == "improve" else (lambda r: min(r["values"]))
    # the worst task first; of equal worst scores, the better mean (a dominated trial is never written)
    best = max(rows, key=lambda r: (score(r), sum(r["values"]) / 2, -r["number"]))
    assert summary["chosen"]["number"] == best["number"]
    assert (out / "search" / "search.png").stat().st_size > 0
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "search" / "journal.log"))
    )
    study = optuna.load_study(study_name="loracook-search", storage=storage)
    if sampler == "nsga2":
        assert len(study.directions) == 2 and summary["study"] == "the objectives"
    else:  # the study's one value is the worse of the two penalised task scores
        assert len(study.directions) == 1 and summary["study"] == "the select score, one objective"
        # augmented Chebyshev (Steuer and Choo, 1983): min_i f_i + rho * mean_i f_i, rho = 0.01; improve: the
        # gain over the starting points told before (one worker: those numbered lower) or this one
        if rule == "improve":
            so_far = [[x["values"] for x in rows[: i + 1] if x.get("start")] for i in range(len(rows))]
            expected = [
                _gain(r["values"], s) + 0.01 * sum(r["values"]) / 2 for r, s in zip(rows, so_far, strict=True)
            ]
        else:
            expected = [min(r["values"]) + 0.01 * sum(r["values"]) / 2 for r in rows]
        assert [r["score"] for r in rows] == pytest.approx(expected)
        assert [t.values for t in study.trials] == [[pytest.approx(e)] for e in expected]


def test_sigterm_while_the_journal_lock_is_held_waits_for_the_append(tmp_path, monkeypatch):
    """A SIGTERM that lands while a worker holds Optuna's journal lock is acted on after the append: the log line
    is whole, the lock file is gone (no 30 s grace wait for the next worker), and the signal still stops us."""
    from loracook.io.signals import Terminated, handling_signals
    from loracook.search.study import journal_backend

    backend = journal_backend(tmp_path / "journal.log")
    acquire = backend._lock.acquire

    def acquire_then_terminated():
        got = acquire()
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, inside the lock
        return got

    monkeypatch.setattr(backend._lock, "acquire", acquire_then_terminated)
    with handling_signals(), pytest.raises(Terminated):
        backend.append_logs([{"op_code": 0, "worker_id": "w", "study_name": "s"}])
    lines = (tmp_path / "journal.log").read_text().splitlines()
    assert [json.loads(line)["study_name"] for line in lines] == ["s"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["journal.log"]


def _journal_study(folder: Path):
    import optuna

    from loracook.search.study import journal_backend

    storage = optuna.storages.JournalStorage(journal_backend(folder / "journal.log"))
    return optuna.create_study(study_name="s", storage=storage), storage


def test_sigterm_between_ask_and_tag_still_tags_the_trial(tmp_path, monkeypatch):
    """Asking a trial and tagging it with its worker are two journal writes; a SIGTERM between them left a RUNNING
    trial no one owned, which held a place in the budget until a 10-minute timeout (a --resume slept that long)."""
    from loracook.io.signals import Terminated, handling_signals
    from loracook.search.study import Place
    from loracook.search.trials import StopFlag, run_trials, worker_tag

    study, storage = _journal_study(tmp_path)
    ask = study.ask

    def ask_then_terminated(*args, **kwargs):
        trial = ask(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs at the next bytecode, before the tag
        return trial

    monkeypatch.setattr(study, "ask", ask_then_terminated)
    with handling_signals(), StopFlag() as stop, pytest.raises(Terminated):
        run_trials(
            study, storage, Place(tmp_path, None, "s"), 5, lambda t: pytest.fail("not evaluated"), stop
        )
    [trial] = study.trials
    assert trial.user_attrs["worker"] == worker_tag()
    assert trial.state.name == "FAIL"  # the stop fails the trial it interrupted: none is left RUNNING


@pytest.mark.parametrize("journal", [True, False])
def test_an_untagged_running_trial_is_failed_at_once_only_under_a_shared_lock(tmp_path, journal):
    """A worker SIGKILLed between ask and tag leaves an untagged RUNNING trial. With a journal every worker asks
    under the lock the caller holds, so it is an orphan now; with an RDB another host may be tagging it."""
    from optuna.trial import TrialState

    from loracook.search.trials import fail_stale

    study, storage = _journal_study(tmp_path)
    study.ask()
    fail_stale(study, storage, untagged_is_orphan=journal)
    assert study.trials[0].state == (TrialState.FAIL if journal else TrialState.RUNNING)


@pytest.mark.parametrize("change", ["examples", "limit", "space"])
def test_resume_refuses_a_study_whose_objective_or_space_changed(zoo, tmp_path, capfd, one_thread, change):
    """--resume continues a study only on what it was scored on: new example rows (same file, same count), a
    new limit or new bounds would mix scores of different objectives under one name."""
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(tmp_path / "s", zoo.models["llama"], sources, search={"budget": 2})
    assert run_cli(["run", recipe], capfd).code == 0
    data = yaml.safe_load(recipe.read_text())
    if change == "examples":
        rows = [{**r, "output": r["output"] + "!"} for r in EXAMPLES]
        examples_file(tmp_path / "s", rows)
    elif change == "limit":
        data["search"]["objective"]["limit"] = 5
    else:
        data["search"]["space"] = {"weights": [0.0, 1.0]}
    data["search"]["budget"] = 3
    recipe.write_text(yaml.safe_dump(data))
    res = run_cli(["run", recipe, "--resume", "--force"], capfd)
    assert res.code == 2 and "no longer matches" in res.err, str(res)
    assert ("scored_on" if change != "space" else "space") in res.err


def test_cmaes_without_its_package_is_one_line(zoo, tmp_path, capfd, monkeypatch):
    import importlib.util

    from loracook.errors import BadInput
    from loracook.search.study import make_sampler

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else real(name, *a)
    )
    with pytest.raises(BadInput, match="cmaes package") as info:
        make_sampler("cmaes", 0)
    assert "pip install" in info.value.one_line()
    sources = {"a": zoo.adapters["a"], "b": zoo.adapters["b"]}
    recipe = search_recipe(tmp_path / "s", zoo.models["llama"], sources, search={"sampler": "cmaes"})
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    res = run_cli(["run", recipe], capfd)
    assert res.code == 2 and "cmaes package" in res.err and "Traceback" not in res.err, str(res)
    assert len(res.err.strip().splitlines()) == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == before  # no output, no study, nothing beside


def test_select_improve_beats_the_starting_points_on_mean_and_worst():
    """`improve` writes the trial whose smaller gain over the starting points (the best mean and the best worst
    objective among them) is largest: here the only trial that beats both on both counts, which neither `worst`
    (a lower mean than a start) nor `mean` (a lower worst) writes. Losses are turned higher-is-better first."""
    from loracook.search.results import Record, select

    rows = [
        Record(0, "COMPLETE", {}, [0.56, 0.47, 0.75], {"start": "all weights 1"}),
        Record(1, "COMPLETE", {}, [0.34, 0.78, 0.84], {"start": "the recipe's merge.weights"}),
        Record(2, "COMPLETE", {}, [0.63, 0.56, 0.63]),  # best worst, mean 0.607 < start 1's 0.653
        Record(3, "COMPLETE", {}, [0.50, 0.75, 0.80]),  # mean 0.683, worst 0.50: both beat the starts
        Record(4, "COMPLETE", {}, [0.40, 0.90, 0.90]),  # best mean, worst 0.40 < start 0's 0.47
    ]
    up = (1.0, 1.0, 1.0)
    starts = [r.values for r in rows if r.attrs.get("start")]
    assert max(rows, key=lambda r: _gain(r.values, starts)).number == 3
    assert select(rows, up, "improve").number == 3
    assert select(rows, up, "worst").number == 2
    assert select(rows, up, "mean").number == 4
    assert select(rows[2:], up, "improve").number == 2  # no starting point finished: as `worst`
    losses = [Record(r.number, r.state, {}, [1 - v for v in r.values], r.attrs) for r in rows]
    assert select(losses, (-1.0, -1.0, -1.0), "improve").number == 3


def test_select_worst_never_writes_a_dominated_trial():
    """Equal worst objectives (common when a task metric moves in steps of 1/items): the better mean wins, not
    the lower trial number; then the lower number."""
    from loracook.search.results import Record, select

    rows = [
        Record(0, "COMPLETE", {}, [0.53, 0.72, 0.63]),
        Record(1, "COMPLETE", {}, [0.53, 0.72, 0.81]),
        Record(2, "COMPLETE", {}, [0.50, 0.99, 0.99]),
        Record(3, "COMPLETE", {}, [0.81, 0.53, 0.72]),
    ]
    assert select(rows, (1.0, 1.0, 1.0), "worst").number == 1
    assert select(rows, (1.0, 1.0, 1.0), "mean").number == 2
    losses = [Record(0, "COMPLETE", {}, [2.0, 3.0]), Record(1, "COMPLETE", {}, [1.0, 3.0])]
    assert select(losses, (-1.0, -1.0), "worst").number == 1
