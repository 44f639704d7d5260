"""Routers (output kind `router`, loracook.routing) against independent references: PEFT's own forward for one
adapter, a `linear` merge written by `loracook run` for fixed weights, each prompt run alone for mixed batches,
PEFT's `create_arrow_model` for Arrow, and a dense float64 SVD for Arrow's prototypes."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from fixtures import LLAMA_LINEAR, make_llama, make_lora, run_cli, write_recipe
from safetensors.torch import load_file, save_file

TASKS = Path(__file__).resolve().parent.parent / "recipes" / "tasks"
NAMES = ("a", "b", "c")
# Three prompt styles, one per source, so that the exemplar routers have something to tell apart.
STYLES = {
    "a": ["the cat sat on the mat", "a dog ran far away", "my old hat is here", "we like green tea"],
    "b": ["1234 5678 90", "31 41 59 26 53", "2718 2818 28", "1 1 2 3 5 8 13"],
    "c": ["HEY!!! WHAT???", "STOP... NOW!!!", "OK?! OK?! OK?!", "#$%& @@ !!"],
}
PROMPTS = ["the red fox jumps", "4711 0815 42", "WOW!!! ???", "a sunny day 77"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """See conftest.one_thread."""


def sharpen(folder: Path, factor: float = 4.0) -> Path:
    """Make each module's top singular value stand out (row 0 of A and column 0 of B scaled), so that PEFT's
    Arrow prototypes (15 power iterations) converge to the top singular vector."""
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    for key, value in tensors.items():
        if key.endswith("lora_A.weight"):
            value[0] *= factor
        elif key.endswith("lora_B.weight"):
            value[:, 0] *= factor
    save_file(tensors, file, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    base = make_llama(root / "base", seed=7, max_position_embeddings=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapters = {
            name: sharpen(make_lora(base, root / name, seed=50 + i, scale=0.3, r=4, lora_alpha=8,
                                    target_modules=LLAMA_LINEAR))
            for i, name in enumerate(NAMES)
        }  # fmt: skip
    exemplars = {}
    for name, prompts in STYLES.items():
        exemplars[name] = root / f"{name}.jsonl"
        exemplars[name].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return {"root": root, "base": base, "adapters": adapters, "exemplars": exemplars}


def router_recipe(lab, out: Path, route: dict, **extra) -> dict:
    if route.get("method", "centroid") != "arrow":
        route = {"exemplars": {n: str(p) for n, p in lab["exemplars"].items()}, **route}
    return {
        "loracook": 1,
        "name": "skills",
        "base": str(lab["base"]),
        "sources": {n: str(p) for n, p in lab["adapters"].items()},
        "output": {"kind": "router", "path": str(out)},
        "route": route,
        **extra,
    }


ROUTES = {
    "centroid": {"method": "centroid", "top_k": 2, "temperature": 0.05},
    "gate": {"method": "gate", "top_k": 1, "seed": 3},
    "arrow": {"method": "arrow", "top_k": 2, "temperature": 0.7},
}


@pytest.fixture(scope="module")
def routers(lab, tmp_path_factory):
    from loracook.cli import main

    folders = {}
    work = tmp_path_factory.mktemp("routers")
    for method, route in ROUTES.items():
        folders[method] = work / method
        recipe = write_recipe(work, router_recipe(lab, folders[method], route), f"{method}.yaml")
        assert main(["run", str(recipe), "--quiet"]) == 0
    return folders


def load_base(lab):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(lab["base"], dtype=torch.float32).eval()


def load(folder):
    from loracook.routing import load_router

    return load_router(folder)


def tokens(model, prompts):
    from loracook.routing.embed import tokenize

    return tokenize(model.router.tokenizer, prompts, "cpu")


def positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)


# ------------------------------------------------------------------------------------------- the artifact


def test_router_folder_holds_everything(lab, routers):
    from peft import PeftConfig

    folder = routers["centroid"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "adapters", "loracook_recipe.yaml", "router.json", "router.safetensors"
    ]  # fmt: skip
    spec = json.loads((folder / "router.json").read_text())
    assert spec["method"] == "centroid" and spec["sources"] == list(NAMES) and spec["layer"] == 1
    assert spec["base"]["num_layers"] == 2 and spec["loracook_version"]
    for name in NAMES:  # plain PEFT adapters, byte-identical tensors
        assert PeftConfig.from_pretrained(folder / "adapters" / name).r == 4
        mine, theirs = (
            load_file(folder / "adapters" / name / "adapter_model.safetensors"),
            load_file(lab["adapters"][name] / "adapter_model.safetensors"),
        )
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert "```yaml" in (folder / "README.md").read_text()


# ------------------------------------------------------------------------------------------ exact mixtures


def test_one_hot_equals_peft_single_adapter(lab, routers):
    from peft import PeftModel

    model = load(routers["centroid"])
    ids, mask = tokens(model, PROMPTS[:1])
    for i, name in enumerate(NAMES):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = PeftModel.from_pretrained(load_base(lab), lab["adapters"][name]).eval()
        with torch.no_grad():
            expected = reference(input_ids=ids).logits
            with model.router.fixed([float(j == i) for j in range(3)]):
                got = model(input_ids=ids).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_fixed_weights_equal_the_linear_merge_from_run(lab, routers, tmp_path, capfd):
    from transformers import AutoModelForCausalLM

    weights = {"a": 0.6, "b": -0.3, "c": 1.1}
    merged = tmp_path / "merged"
    recipe = {
        "loracook": 1,
        "base": str(lab["base"]),
        "sources": {n: str(p) for n, p in lab["adapters"].items()},
        "merge": {"method": "linear", "weights": weights},
        "output": {"kind": "model", "path": str(merged)},
    }
    assert run_cli(["run", write_recipe(tmp_path, recipe), "--quiet"], capfd).code == 0
    reference = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    model = load(routers["gate"])
    ids, mask = tokens(model, PROMPTS[:2])
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
        with model.router.fixed(weights):
            got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["centroid", "gate", "arrow"])
def test_mixed_batch_rows_get_what_they_get_alone(routers, method):
    model = load(routers[method])
    ids, mask = tokens(model, PROMPTS)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        weights = model.router.last_weights.clone()
        for row, prompt in enumerate(PROMPTS):
            one, _ = tokens(model, [prompt])
            alone = model(input_ids=one).logits
            length = one.shape[1]
            torch.testing.assert_close(batch[row, -length:], alone[0], atol=1e-4, rtol=0)
            torch.testing.assert_close(weights[row], model.router.last_weights[0], atol=1e-5, rtol=0)
    if method != "arrow":  # the rows really were routed differently
        assert len({int(w.argmax()) for w in weights}) >= 2, weights
    # generate: a mixed batch gives each row the tokens it gets alone
    together = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        one, _ = tokens(model, [prompt])
        alone = model.generate(input_ids=one, max_new_tokens=6, do_sample=False)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist()


def test_exemplar_routers_route_each_style_to_its_source(routers):
    for method in ("centroid", "gate"):
        model = load(routers[method])
        weights = model.router.weights([prompts[0] for prompts in STYLES.values()])
        assert weights.argmax(dim=-1).tolist() == [0, 1, 2], (method, weights)
        assert torch.allclose(weights.sum(dim=-1), torch.ones(3))


# --------------------------------------------------------------------------------------------------- arrow


def test_arrow_equals_peft_create_arrow_model(lab, routers):
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(
        top_k=ROUTES["arrow"]["top_k"], router_temperature=ROUTES["arrow"]["temperature"], rng_seed=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = create_arrow_model(
            load_base(lab), [str(lab["adapters"][n]) for n in NAMES], config
        ).eval()
    model = load(routers["arrow"])
    for prompt in PROMPTS:
        ids, _ = tokens(model, [prompt])
        with torch.no_grad():
            torch.testing.assert_close(
                model(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0
            )


def test_arrow_prototypes_are_the_top_right_singular_vectors(lab, routers):
    tensors = load_file(routers["arrow"] / "router.safetensors")
    for i, name in enumerate(NAMES):
        factors = load_file(lab["adapters"][name] / "adapter_model.safetensors")
        for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
            a = factors[f"base_model.model.{module}.lora_A.weight"].double()
            b = factors[f"base_model.model.{module}.lora_B.weight"].double()
            top = torch.linalg.svd(b @ a)[2][0]  # dense ΔW, float64: the independent reference
            proto = tensors[f"arrow.{module}.prototypes"][i].double()
            assert abs(float(proto @ top)) == pytest.approx(1.0, abs=1e-6)


def test_prompt_embedding_is_the_mean_hidden_state_without_the_first_token(lab):
    """embed_tokens (a pass stopped at the layer, left padding) against transformers' own hidden_states."""
    from transformers import AutoTokenizer

    from loracook.routing.embed import embed_tokens, tokenize

    model, tok = load_base(lab), AutoTokenizer.from_pretrained(lab["base"])
    ids, mask = tokenize(tok, PROMPTS, "cpu")
    with torch.no_grad():
        got = embed_tokens(model, ids, mask, layer=1)
        for row, prompt in enumerate(PROMPTS):
            one = tok(prompt, return_tensors="pt")["input_ids"]
            hidden = model(input_ids=one, output_hidden_states=True).hidden_states[1][0]
            torch.testing.assert_close(got[row], hidden[1:].mean(dim=0), atol=1e-5, rtol=0)


def test_gate_is_seeded():
    from loracook.routing.methods import fit_gate

    gen = torch.Generator().manual_seed(0)
    embeddings = [torch.randn(5, 8, generator=gen) + i for i in range(3)]
    first, second = fit_gate(embeddings, seed=4, steps=20), fit_gate(embeddings, seed=4, steps=20)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["w1"], fit_gate(embeddings, seed=5, steps=20)["w1"])


# ------------------------------------------------------------------------------------------- evaluation


def test_loglikelihood_is_routed_on_the_context_only(routers):
    from loracook.routing.evaluation import routed_lm

    model = load(routers["centroid"])
    tok = model.router.tokenizer
    lm = routed_lm(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    context = tok("the cat sat", add_special_tokens=False)["input_ids"]
    continuations = [
        tok(c, add_special_tokens=False)["input_ids"] for c in (" 1234 5678 90", " HEY!!! ???", " on it")
    ]
    requests = [(("", ""), context, cont) for cont in continuations]
    got = [ll for ll, _ in lm._loglikelihood_tokens(requests, disable_tqdm=True)]
    chosen = model.router.decide_tokens([context])
    moved = False
    for cont, ll in zip(continuations, got, strict=True):
        whole = torch.tensor([context + cont])
        with torch.no_grad(), model.router.fixed(chosen):
            logprobs = torch.log_softmax(model(input_ids=whole[:, :-1]).logits, dim=-1)
        expected = sum(float(logprobs[0, len(context) - 1 + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(expected, abs=1e-4)
        moved |= not torch.allclose(model.router.decide_tokens([context + cont[:-1]]), chosen, atol=1e-3)
    assert moved, "routing on context + continuation never differed: the test proves nothing"


def test_run_evaluates_the_router_beside_baselines_and_eval_verb(lab, tmp_path, capfd):
    out = tmp_path / "router"
    evaluate = {"tasks": [str(TASKS / "capitals.yaml")], "limit": 2, "batch_size": 4, "baselines": ["base"]}
    recipe = router_recipe(lab, out, ROUTES["centroid"], evaluate=evaluate)
    result = run_cli(["run", write_recipe(tmp_path, recipe)], capfd)
    assert result.code == 0, result
    names = [c["name"] for c in json.loads((out / "eval_results.json").read_text())["candidates"]]
    assert names == ["base", "skills"]
    report = tmp_path / "report"
    args = ["eval", out, "--tasks", TASKS / "capitals.yaml", "--limit", "2", "--report-dir", report]
    result = run_cli(args, capfd)
    assert result.code == 0, result
    assert json.loads((report / "eval_results.json").read_text())["candidates"][0]["kind"] == "router"


# --------------------------------------------------------------------------------------------------- CLI


def test_route_and_generate_verbs(lab, routers, tmp_path, capfd):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    result = run_cli(["route", routers["gate"], "--file", prompts], capfd)
    assert result.code == 0, result
    rows = [json.loads(line) for line in result.out.splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS
    for row in rows:
        assert set(row["weights"]) == set(NAMES) and sum(row["weights"].values()) == pytest.approx(1.0)
        assert row["top"] == max(row["weights"], key=row["weights"].get)
        assert Path(row["adapter"]) == routers["gate"] / "adapters" / row["top"]
    result = run_cli(["generate", routers["gate"], PROMPTS[1], "--explain", "--max-new-tokens", "4"], capfd)
    assert result.code == 0, result
    assert result.out.startswith("routing: a ") and "top-1:" in result.out
    result = run_cli(
        ["generate", routers["arrow"], "--file", prompts, "--max-new-tokens", "3", "--explain"], capfd
    )
    assert result.code == 0, result
    assert [json.loads(line)["prompt"] for line in result.out.splitlines()] == PROMPTS
    result = run_cli(["generate", lab["base"], "hello", "--max-new-tokens", "3"], capfd)  # a plain model
    assert result.code == 0, result


def test_validate_and_plan_a_router_recipe(lab, tmp_path, capfd):
    recipe = write_recipe(tmp_path, router_recipe(lab, tmp_path / "out", ROUTES["gate"]))
    assert run_cli(["validate", recipe], capfd).code == 0
    result = run_cli(["plan", recipe], capfd)
    assert result.code == 0, result
    assert "router: gate over 3 sources (12 exemplars, embedding layer 1 of 2)" in result.out
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- bad inputs


def _bad_recipe(lab, tmp_path, case: str) -> dict:
    out = tmp_path / "out"
    route = dict(ROUTES["centroid"])
    recipe = router_recipe(lab, out, route)
    exemplars = recipe["route"]["exemplars"]
    if case == "exemplars-missing":
        exemplars["b"] = str(tmp_path / "nope.jsonl")
    elif case == "exemplars-empty":
        (tmp_path / "empty.jsonl").write_text("\n\n")
        exemplars["b"] = str(tmp_path / "empty.jsonl")
    elif case == "exemplars-malformed":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"text": "no prompt key"}\n')
        exemplars["b"] = str(tmp_path / "bad.jsonl")
    elif case == "exemplars-not-json":
        (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{prompt: oops\n')
        exemplars["b"] = str(tmp_path / "bad.jsonl")
    elif case in ("no-exemplars-centroid", "no-exemplars-gate"):
        recipe["route"]["method"] = case.rsplit("-", 1)[1]
        del exemplars["c"]
    elif case == "top-k-zero":
        recipe["route"]["top_k"] = 0
    elif case == "top-k-too-large":
        recipe["route"]["top_k"] = 4
    elif case == "temperature-zero":
        recipe["route"]["temperature"] = 0
    elif case == "temperature-negative":
        recipe["route"]["temperature"] = -1.0
    elif case == "different-bases":
        wide = make_llama(tmp_path / "wide", seed=9, hidden_size=48, intermediate_size=96)
        recipe["sources"]["c"] = str(
            make_lora(wide, tmp_path / "wide_lora", seed=1, r=4, target_modules=["q_proj"])
        )
    elif case == "layer-out-of-range":
        recipe["route"]["layer"] = 7
    elif case == "merge-section":
        recipe["merge"] = {"method": "linear", "weights": {"a": 1.0}}
    return recipe


BAD_RECIPES = {
    "exemplars-missing": "not found",
    "exemplars-empty": "empty",
    "exemplars-malformed": 'no "prompt" key',
    "exemplars-not-json": "not valid JSON",
    "no-exemplars-centroid": "needs exemplar prompts",
    "no-exemplars-gate": "needs exemplar prompts",
    "top-k-zero": "top_k",
    "top-k-too-large": "larger than the number of sources",
    "temperature-zero": "temperature",
    "temperature-negative": "temperature",
    "different-bases": "does not fit the base model",
    "layer-out-of-range": "route.layer 7",
    "merge-section": "does not merge",
}


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_bad_router_recipes_exit_2_with_one_line(lab, tmp_path, capfd, case):
    recipe = write_recipe(tmp_path, _bad_recipe(lab, tmp_path, case))
    for verb in ("run", "validate"):
        result = run_cli([verb, recipe], capfd)
        assert result.code == 2, result
        assert len(result.err_lines) == 1 and "Traceback" not in result.err, result
        assert BAD_RECIPES[case] in result.err, result
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_bad_folders_and_broken_routers_exit_2(lab, routers, tmp_path, capfd):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    broken = tmp_path / "broken"
    shutil.copytree(routers["centroid"], broken)
    (broken / "adapters" / "b" / "adapter_model.safetensors").unlink()
    not_a_model = lab["root"]  # a folder of adapters and exemplar files
    cases = [
        (["generate", not_a_model, "hi"], "not a model or adapter folder"),
        (["route", not_a_model, "--file", prompts], "not a router folder"),
        (["route", lab["base"], "--file", prompts], "not a router folder"),
        (["eval", not_a_model, "--tasks", TASKS / "capitals.yaml"], "not a model or adapter folder"),
        (["generate", tmp_path / "missing", "hi"], "no such folder"),
        (["generate", broken, "hi"], "adapters/b/adapter_model.safetensors is missing"),
        (["route", broken, "--file", prompts], "adapters/b/adapter_model.safetensors is missing"),
        (
            ["eval", broken, "--tasks", TASKS / "capitals.yaml"],
            "adapters/b/adapter_model.safetensors is missing",
        ),
        (["route", routers["gate"], "--file", tmp_path / "none.jsonl"], "prompt file not found"),
        (["generate", routers["gate"]], "give a prompt or --file"),
        (["generate", lab["base"], "hi", "--explain"], "not a router folder"),
    ]
    for args, phrase in cases:
        result = run_cli(args, capfd)
        assert result.code == 2, (args, result)
        assert len(result.err_lines) == 1 and phrase in result.err, (args, result)
