"""LoraMixture against independent references: PEFT's own forward for one adapter, a dense merged model built
here in float64 from PEFT's get_delta_weight for weighted sums, and each prompt run alone for per-row routing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from fixtures import LLAMA_LINEAR, make_gpt2, make_llama, make_lora

from loracook.mixture import LoraFactors, LoraMixture, layer_index, load_peft_factors

# name -> (base, LoraConfig kwargs + seed)
ADAPTERS = {
    "a": ("llama", dict(seed=31, r=8, lora_alpha=16, target_modules=LLAMA_LINEAR)),
    # rsLoRA with rank/alpha patterns, and an embedding LoRA
    "b": (
        "llama",
        dict(
            seed=32,
            r=4,
            lora_alpha=8,
            use_rslora=True,
            target_modules=["embed_tokens", "q_proj", "v_proj", "up_proj", "down_proj"],
            rank_pattern={r"layers\.1\.self_attn\.v_proj": 2, "down_proj": 6},
            alpha_pattern={"up_proj": 3, r"layers\.0\.self_attn\.q_proj": 32},
        ),
    ),
    "c": ("llama", dict(seed=33, r=2, lora_alpha=2, target_modules=["o_proj", "gate_proj", "lm_head"])),
    "tied": ("llama_tied", dict(seed=34, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "conv": (
        "gpt2",
        dict(seed=35, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    ),
    "dora": ("llama", dict(seed=36, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"])),
    "bias": ("llama", dict(seed=37, r=4, lora_alpha=8, lora_bias=True, target_modules=["q_proj"])),
    "mts": (
        "llama",
        dict(seed=38, r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, one_thread) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixture")
    paths = {
        "llama": make_llama(root / "llama", seed=7),
        "llama_tied": make_llama(root / "llama_tied", seed=8, tie_word_embeddings=True),
        "gpt2": make_gpt2(root / "gpt2", seed=9),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (base, spec) in ADAPTERS.items():
            assert name not in paths, "adapter and model names must differ"
            paths[name] = make_lora(paths[base], root / f"adapter_{name}", **spec)
    return paths


def load(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def peft_model(zoo, adapter: str, dtype=torch.float32):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(load(zoo[ADAPTERS[adapter][0]], dtype), zoo[adapter]).eval()


def peft_deltas(zoo, adapter: str) -> dict[str, torch.Tensor]:
    """ΔW of every adapted module in float64, as PEFT computes it (in the base's storage orientation)."""
    model = peft_model(zoo, adapter, torch.float64)
    deltas = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "scaling", {}):
            deltas[name] = module.get_delta_weight("default").detach()
    assert deltas
    return deltas


def dense_merge(zoo, base: str, weights: dict[str, float], per_module=lambda name: None):
    """The merged model W + Σ w_i ΔW_i, summed in float64 and loaded into a fresh fp32 copy of the base."""
    model = load(zoo[base])
    modules = dict(model.named_modules())
    totals: dict[str, torch.Tensor] = {}
    for adapter, default in weights.items():
        for name, delta in peft_deltas(zoo, adapter).items():
            override = per_module(name)
            w = default if override is None else override[list(weights).index(adapter)]
            totals[name] = totals.get(name, 0) + w * delta
    with torch.no_grad():
        for name, delta in totals.items():
            weight = modules[name].weight
            weight.copy_((weight.double() + delta).float())
    return model


def ids_batch(seed=0, rows=2, length=9):
    return torch.randint(4, 120, (rows, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------------------
# (i) one-hot coefficients equal PEFT's own model with that adapter


@pytest.mark.parametrize(
    "base, adapters", [("llama", ["a", "b", "c"]), ("llama_tied", ["tied"]), ("gpt2", ["conv"])]
)
def test_one_hot_equals_peft(zoo, base, adapters):
    model, ids = load(zoo[base]), ids_batch()
    # PEFT's unmerged forward adapts only the named module of a tied pair: tied_output=False
    with LoraMixture.from_peft(model, {n: zoo[n] for n in adapters}, tied_output=False) as mix:
        for i, adapter in enumerate(adapters):
            mix.set([1.0 if j == i else 0.0 for j in range(len(adapters))])
            got = model(ids).logits
            want = peft_model(zoo, adapter)(input_ids=ids).logits
            assert (got - want).abs().max() < 1e-5, adapter
            assert (
                want - load(zoo[base])(ids).logits
            ).abs().max() > 1e-2  # the adapter does change something


def test_loader_scales_follow_peft(zoo):
    """rsLoRA with rank/alpha patterns: every module's scale is PEFT's scaling."""
    factors = load_peft_factors(zoo["b"])
    model = peft_model(zoo, "b")
    for name, module in model.base_model.model.named_modules():
        if name in factors:
            assert factors[name].scale == pytest.approx(module.scaling["default"], rel=1e-12), name
            assert factors[name].rank == module.r["default"]
    assert factors["model.layers.1.self_attn.v_proj"].rank == 2


# ----------------------------------------------------------------------------------------------------------
# (ii) coefficients w equal the dense merged model


def test_weighted_sum_equals_dense_merge(zoo):
    weights = {"a": 0.7, "b": -1.3, "c": 0.4}
    model, ids = load(zoo["llama"]), ids_batch(1)
    want = dense_merge(zoo, "llama", weights)(ids).logits
    with LoraMixture.from_peft(model, {n: zoo[n] for n in weights}) as mix:
        mix.set(list(weights.values()))
        assert (model(ids).logits - want).abs().max() < 1e-4
        mix.set(weights)  # the same, by name
        assert (model(ids).logits - want).abs().max() < 1e-4


def test_per_module_overrides_equal_dense_merge(zoo):
    """Per source × layer group (a function of the module name) and per module (a dict) both match."""
    weights = {"a": 0.5, "b": 1.0}
    group = {0: [1.2, -0.4], 1: [-0.6, 0.9]}

    def by_layer(name):
        return None if layer_index(name) is None else group[layer_index(name)]

    model, ids = load(zoo["llama"]), ids_batch(2)
    want = dense_merge(zoo, "llama", weights, by_layer)(ids).logits
    with LoraMixture.from_peft(model, {n: zoo[n] for n in weights}) as mix:
        mix.set([0.5, 1.0], per_module=by_layer)
        assert (model(ids).logits - want).abs().max() < 1e-4
        one = "model.layers.1.mlp.up_proj"
        mix.set([0.5, 1.0], per_module={one: [0.0, -2.0]})
        want = dense_merge(zoo, "llama", weights, lambda n: [0.0, -2.0] if n == one else None)(ids).logits
        assert (model(ids).logits - want).abs().max() < 1e-4


def test_tied_embedding_lora_equals_merged_model(zoo):
    """With tied embeddings the merged table is also the output head (tied_output=True, the default)."""
    model, ids = load(zoo["llama_tied"]), ids_batch(3)
    want = dense_merge(zoo, "llama_tied", {"tied": 0.8})(ids).logits
    with LoraMixture.from_peft(model, {"tied": zoo["tied"]}) as mix:
        assert "lm_head" in mix.modules
        mix.set([0.8])
        assert (model(ids).logits - want).abs().max() < 1e-4


def test_conv1d_equals_dense_merge(zoo):
    model, ids = load(zoo["gpt2"]), ids_batch(4)
    want = dense_merge(zoo, "gpt2", {"conv": -0.9})(ids).logits
    with LoraMixture.from_peft(model, {"conv": zoo["conv"]}) as mix:
        mix.set([-0.9])
        assert (model(ids).logits - want).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------------
# (iii) per-row coefficients: each row gets the logits it gets alone


ROWS = torch.tensor([[1.0, 0.0, 0.0], [0.3, -0.8, 1.5], [0.0, 0.0, 1.0]])


def alone(model, mix, row_ids, coefficients):
    mix.set(coefficients)
    return model(row_ids[None]).logits[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_per_row_coefficients_follow_rows(zoo, side):
    model = load(zoo["llama"])
    prompts = [ids_batch(10 + i, rows=1, length=n)[0] for i, n in enumerate([7, 11, 4])]
    width = max(len(p) for p in prompts)
    ids = torch.full((3, width), 3)
    mask = torch.zeros((3, width), dtype=torch.long)
    for r, p in enumerate(prompts):
        span = slice(0, len(p)) if side == "right" else slice(width - len(p), width)
        ids[r, span], mask[r, span] = p, 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with LoraMixture.from_peft(model, {n: zoo[n] for n in "abc"}) as mix, torch.inference_mode():
        mix.set(ROWS)
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for r, p in enumerate(prompts):
            keep = mask[r].bool()
            assert (batched[r, keep] - alone(model, mix, p, ROWS[r])).abs().max() < 1e-5, r


def test_per_row_rejects_a_batch_of_another_size(zoo):
    model = load(zoo["llama"])
    with LoraMixture.from_peft(model, {"a": zoo["a"], "b": zoo["b"]}) as mix:
        mix.set(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        with pytest.raises(ValueError, match="2 rows but the batch has 3"):
            model(ids_batch(rows=3))


# ----------------------------------------------------------------------------------------------------------
# routing inside the forward pass


def test_router_per_token_is_exact_on_a_module(zoo):
    """fn(name, x) -> [batch, seq, n]: each token gets its own mixture of the dense deltas."""
    model = load(zoo["llama"])
    name = "model.layers.0.self_attn.q_proj"
    module = dict(model.named_modules())[name]
    deltas = [peft_deltas(zoo, a)[name] for a in ("a", "b")]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5))
    coef = torch.randn(2, 5, 2, generator=torch.Generator().manual_seed(6))
    seen = []

    def router(module_name, inp):
        seen.append(module_name)
        return coef

    with LoraMixture.from_peft(model, {"a": zoo["a"], "b": zoo["b"]}) as mix:
        mix.route(router)
        got = module(x)
    xd = x.double()
    want = xd @ module.weight.double().T + sum(
        coef[..., i, None].double() * (xd @ d.T) for i, d in enumerate(deltas)
    )
    assert seen == [name]
    assert (got.double() - want).abs().max() < 1e-5


def test_router_per_row_equals_set_and_passes_gradients(zoo):
    model, ids = load(zoo["llama"]), ids_batch(7)
    gate = torch.tensor([[0.2, 0.9], [-0.5, 0.1]], requires_grad=True)
    with LoraMixture.from_peft(model, {"a": zoo["a"], "b": zoo["b"]}) as mix:
        mix.set(gate.detach())
        want = model(ids).logits
        mix.route(lambda name, x: gate)
        got = model(ids).logits
        got.square().sum().backward()
    assert (got - want).abs().max() < 1e-6
    assert gate.grad is not None and gate.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# (iv) detach restores the model exactly


def test_detach_restores_bit_identical_logits(zoo):
    model, ids = load(zoo["llama_tied"]), ids_batch(8)
    before = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    mix = LoraMixture.from_peft(model, {"tied": zoo["tied"]}).attach()
    assert torch.equal(model(ids).logits, before)  # coefficients start at 0
    mix.set([1.0])
    assert not torch.equal(model(ids).logits, before)
    mix.detach()
    assert torch.equal(model(ids).logits, before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------------
# (v) generate with per-row coefficients


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_with_per_row_coefficients(zoo, beams):
    model = load(zoo["llama"])
    prompts = [ids_batch(20, rows=1, length=6)[0], ids_batch(21, rows=1, length=3)[0]]
    ids = torch.full((2, 6), 3)
    mask = torch.zeros((2, 6), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, 6 - len(p) :], mask[r, 6 - len(p) :] = p, 1
    coefficients = torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 2.0]])
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=3, eos_token_id=None)
    with LoraMixture.from_peft(model, {n: zoo[n] for n in "abc"}) as mix, torch.inference_mode():
        mix.set(coefficients)
        batched = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, 6:]
        for r, p in enumerate(prompts):
            mix.set(coefficients[r])
            single = model.generate(input_ids=p[None], attention_mask=torch.ones_like(p)[None], **kwargs)
            assert torch.equal(batched[r], single[0, len(p) :]), r
        mix.set(coefficients[1])
        assert not torch.equal(
            batched[0], model.generate(input_ids=ids[:1], attention_mask=mask[:1], **kwargs)[0, 6:]
        )


# ----------------------------------------------------------------------------------------------------------
# inputs the mixture refuses


@pytest.mark.parametrize(
    "adapter, message", [("dora", "DoRA"), ("bias", "lora_bias"), ("mts", "modules_to_save")]
)
def test_loader_refuses_what_is_not_a_plain_lora(zoo, adapter, message):
    with pytest.raises(ValueError, match=message):
        load_peft_factors(zoo[adapter])


def test_bad_sources_and_coefficients(zoo):
    model = load(zoo["llama"])
    a = torch.zeros(2, 32)
    with pytest.raises(ValueError, match="no module 'model.nope'"):
        LoraMixture(model, {"x": {"model.nope": LoraFactors(a, torch.zeros(32, 2), 1.0)}})
    with pytest.raises(ValueError, match="do not fit a linear of 32 -> 16"):
        LoraMixture(
            model, {"x": {"model.layers.0.self_attn.k_proj": LoraFactors(a, torch.zeros(32, 2), 1.0)}}
        )
    with pytest.raises(ValueError, match="is a LlamaRMSNorm"):
        LoraMixture(model, {"x": {"model.norm": LoraFactors(a, torch.zeros(32, 2), 1.0)}})
    mix = LoraMixture.from_peft(model, {"a": zoo["a"], "b": zoo["b"]})
    with pytest.raises(ValueError, match="miss \\['b'\\]"):
        mix.set({"a": 1.0})
    with pytest.raises(ValueError, match="must be \\[2\\] or \\[batch, 2\\]"):
        mix.set([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="does not adapt"):
        mix.set([1.0, 1.0], per_module={"model.norm": [0.0, 0.0]})


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("model.embed_tokens") is None
    assert layer_index("lm_head") is None


def test_mixture_runs_in_bfloat16(zoo):
    """Factors follow the model's dtype; the result is close to the fp32 mixture."""
    model32, model16, ids = load(zoo["llama"]), load(zoo["llama"], torch.bfloat16), ids_batch(9)
    with (
        LoraMixture.from_peft(model32, {"a": zoo["a"]}) as m32,
        LoraMixture.from_peft(model16, {"a": zoo["a"]}) as m16,
    ):
        m32.set([1.0])
        m16.set([1.0])
        got = model16(ids).logits
        assert got.dtype == torch.bfloat16
        assert (got.float() - model32(ids).logits).abs().max() < 0.1
