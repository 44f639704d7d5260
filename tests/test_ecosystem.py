"""The ecosystem features through the CLI: `output.format: gguf` (model and adapter), `output.serve`, the hub
card front matter, `validate --format github`, `loracook init`, and `--device cuda` without CUDA.

The GGUF model is checked through transformers' own GGUF loader against the safetensors output of the same
recipe; the GGUF adapter is read back with gguf.GGUFReader and compared with the PEFT adapter output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import make_lora, read_tensors, run_cli, write_recipe
from test_gguf_write import build_model, gguf_model, logits

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    base = build_model(root / "llama")
    adapter = make_lora(base, root / "facts", seed=3, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    return base, adapter


def recipe(folder: Path, base: Path, sources: dict, **output) -> Path:
    data = {
        "loracook": 1,
        "base": str(base),
        "sources": {k: str(v) for k, v in sources.items()},
        "merge": {"method": "linear"},
        "output": {"path": str(folder / "out"), **output},
    }
    return write_recipe(folder, data)


def test_gguf_model_equals_the_safetensors_model_through_transformers(bpe_llama, tmp_path, capfd):
    base, adapter = bpe_llama
    st = recipe(tmp_path / "st", base, {"facts": adapter}, kind="model", dtype="float32")
    gg = recipe(tmp_path / "gg", base, {"facts": adapter}, kind="model", format="gguf", gguf_type="f32")
    for path in (st, gg):
        res = run_cli(["run", path], capfd)
        assert res.code == 0, res
    folder = tmp_path / "gg" / "out"
    file = folder / "model.gguf"
    assert file.is_file() and not list(folder.glob("*.safetensors"))
    single = tmp_path / "gguf-alone"
    single.mkdir()
    shutil.copy(file, single / "model.gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)("the merged model and its GGUF twin")["input_ids"]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "st" / "out", dtype=torch.float32).eval()
    assert torch.equal(logits(gguf_model(single / "model.gguf"), ids), logits(merged, ids))


def test_gguf_adapter_holds_the_same_factors(bpe_llama, tmp_path, capfd):
    import gguf

    base, adapter = bpe_llama
    st = recipe(tmp_path / "st", base, {"facts": adapter}, kind="adapter")
    gg = recipe(tmp_path / "gg", base, {"facts": adapter}, kind="adapter", format="gguf")
    for path in (st, gg):
        assert run_cli(["run", path], capfd).code == 0
    peft = read_tensors(tmp_path / "st" / "out")
    reader = gguf.GGUFReader(tmp_path / "gg" / "out" / "adapter.gguf")
    fields = {f.name: f for f in reader.fields.values()}
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    read = {
        t.name: torch.from_numpy(t.data.copy()).reshape(tuple(reversed(t.shape.tolist())))
        for t in reader.tensors
    }
    assert len(read) == len(peft)
    for name, tensor in read.items():
        layer, kind = name.split(".")[1], name.split(".")[2]  # blk.N.attn_q.weight.lora_a
        proj = {"attn_q": "q_proj", "attn_v": "v_proj"}[kind]
        factor = "lora_A" if name.endswith("lora_a") else "lora_B"
        expected = peft[f"base_model.model.model.layers.{layer}.self_attn.{proj}.{factor}.weight"]
        if kind == "attn_q" and factor == "lora_B":
            expected = llama_cpp_permute(expected, n_head=4)  # the rows of Q, as llama.cpp stores W_q
        assert torch.allclose(tensor.float(), expected.reshape(tensor.shape), atol=1e-6), name


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter (LlamaModel.permute): each head's rotary halves interleaved, rows only."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_serve_vllm_refuses_a_cat_above_rank_512_at_validate(tmp_path, capfd):
    from fixtures import make_llama

    base = make_llama(tmp_path / "llama")
    big = {
        n: make_lora(base, tmp_path / n, seed=i, r=300, lora_alpha=300, target_modules=["q_proj"])
        for i, n in enumerate(("a", "b"))
    }
    data = {
        "loracook": 1,
        "base": str(base),
        "sources": {k: str(v) for k, v in big.items()},
        "merge": {"method": "cat"},
        "output": {"kind": "adapter", "path": str(tmp_path / "out"), "serve": "vllm"},
    }
    res = run_cli(["validate", write_recipe(tmp_path, data)], capfd)
    assert res.code == 2 and len(res.err_lines) == 1, res
    assert "600" in res.err and "svd" in res.err and "rank: 512" in res.err, res.err  # the fix is named
    data["merge"] = {"method": "svd", "rank": 32}
    assert run_cli(["validate", write_recipe(tmp_path, data)], capfd).code == 0


def test_card_front_matter_for_the_hub(bpe_llama, tmp_path, capfd):
    base, adapter = bpe_llama
    for kind, relation, library in (("adapter", "adapter", "peft"), ("model", "merge", "transformers")):
        path = recipe(tmp_path / kind, base, {"facts": adapter}, kind=kind)
        assert run_cli(["run", path], capfd).code == 0
        text = (tmp_path / kind / "out" / "README.md").read_text()
        front = yaml.safe_load(text.split("---")[1])
        assert front["base_model_relation"] == relation and front["library_name"] == library
        assert {"loracook", "lora", "linear"} <= set(front["tags"])
    assert (
        "vLLM: yes, with `--enable-lora --max-lora-rank 8`"
        in (tmp_path / "adapter" / "out" / "README.md").read_text()
    )


def test_validate_github_format(tmp_path, capfd):
    bad = write_recipe(tmp_path, "loracook: 1\nbase: ./nowhere\nsources: {a: ./x}\nmerge: {method: lineer}\n")
    res = run_cli(["validate", "--format", "github", bad], capfd)
    assert res.code == 2
    line = res.out.strip().splitlines()[-1]
    assert line.startswith("::error file=") and ",line=4," in line and "lineer" in line, res


def test_init_on_the_skill_adapters_validates(tmp_path, capfd):
    adapters = [REPO / "recipes" / "skills" / "adapters" / n for n in ("kessary", "json", "headline")]
    out = tmp_path / "recipes" / "skills.yaml"
    res = run_cli(["init", *map(str, adapters), "--method", "ties", "-o", str(out)], capfd)
    assert res.code == 0, res
    text = out.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    res = run_cli(["validate", str(out)], capfd)
    assert res.code == 0, res


def test_device_cuda_without_cuda_is_one_line(tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    bad = write_recipe(tmp_path, "loracook: 1\nbase: ./nowhere\nsources: {a: ./x}\n")
    res = run_cli(["run", bad, "--device", "cuda"], capfd)
    assert res.code == 2 and len(res.err_lines) == 1 and "CUDA is not available" in res.err, res
