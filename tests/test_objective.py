"""ExamplesObjective against a brute-force reference: the full model with HF's own loss (labels, -100 on the
input tokens), one example at a time, pooled over output tokens as the objective documents."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fixtures import LLAMA_LINEAR, make_llama, make_lora

from loracook.mixture import LoraMixture
from loracook.objective import ExamplesObjective, load_examples

EXAMPLES = [
    ("Capital of Vell? ", "Mark"),
    ("2+2=", "4"),
    ("Say it loudly: hi there", " HI THERE!"),
    ("q", "a fairly long answer, 30 chars"),
    ("The sky is ", "blue."),
    ("Translate 'chat': ", "cat"),
    ("x", "y"),
]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("objective")
    base = make_llama(root / "llama", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapter = make_lora(base, root / "adapter", seed=5, r=4, lora_alpha=8, target_modules=LLAMA_LINEAR)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return base, adapter, model, AutoTokenizer.from_pretrained(base)


def hf_losses(model, pairs) -> tuple[list[float], list[int]]:
    """Per example: HF's mean loss over its output tokens, and how many there are."""
    losses, counts = [], []
    with torch.no_grad():
        for prompt, output in pairs:
            ids = torch.tensor([prompt + output])
            labels = torch.tensor([[-100] * len(prompt) + output])
            losses.append(float(model(input_ids=ids, labels=labels).loss))
            counts.append(len(output))
    return losses, counts


def pooled(losses, counts) -> float:
    return sum(loss * n for loss, n in zip(losses, counts, strict=True)) / sum(counts)


def plain_pairs(tokenizer, examples, eos=False):
    return [
        (
            tokenizer(i)["input_ids"],
            tokenizer(o, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else []),
        )
        for i, o in examples
    ]


def test_objective_equals_brute_force(tiny):
    _, _, model, tok = tiny
    losses, counts = hf_losses(model, plain_pairs(tok, EXAMPLES))
    objective = ExamplesObjective(model, tok, EXAMPLES)
    assert objective.n_tokens == sum(counts)
    assert objective() == pytest.approx(pooled(losses, counts), abs=1e-5)
    assert torch.allclose(objective.per_example(), torch.tensor(losses, dtype=torch.float64), atol=1e-5)


def test_eos_is_scored_when_asked(tiny):
    _, _, model, tok = tiny
    losses, counts = hf_losses(model, plain_pairs(tok, EXAMPLES, eos=True))
    objective = ExamplesObjective(model, tok, EXAMPLES, eos=True)
    assert objective() == pytest.approx(pooled(losses, counts), abs=1e-5)


@pytest.mark.parametrize("batch_tokens", [1, 40, 100, 100_000])
def test_batching_does_not_change_the_value(tiny, batch_tokens):
    _, _, model, tok = tiny
    reference = ExamplesObjective(model, tok, EXAMPLES, batch_tokens=1)()
    objective = ExamplesObjective(model, tok, EXAMPLES, batch_tokens=batch_tokens)
    if batch_tokens == 1:
        assert len(objective.batches) == len(EXAMPLES)
    if batch_tokens == 100_000:
        assert len(objective.batches) == 1
    assert objective() == pytest.approx(reference, abs=1e-6)


def test_batches_are_length_sorted_and_bounded(tiny):
    _, _, model, tok = tiny
    objective = ExamplesObjective(model, tok, EXAMPLES, batch_tokens=60)
    for batch in objective.batches:
        assert batch.ids.numel() <= 60 or batch.ids.shape[0] == 1
    widths = [b.ids.shape[1] for b in objective.batches]
    assert widths == sorted(widths, reverse=True)


def test_chat_template(tiny):
    """The input as a ChatML user turn plus the generation prompt; the scored reply ends at <|im_end|>."""
    _, _, model, tok = tiny
    tok = type(tok).from_pretrained(tiny[0])
    tok.chat_template = CHATML
    pairs = [
        (
            tok(f"<|im_start|>user\n{i}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
                "input_ids"
            ],
            tok(f"{o}<|im_end|>", add_special_tokens=False)["input_ids"],
        )
        for i, o in EXAMPLES[:4]
    ]
    losses, counts = hf_losses(model, pairs)
    objective = ExamplesObjective(model, tok, EXAMPLES[:4], chat_template=True, batch_tokens=128)
    assert objective() == pytest.approx(pooled(losses, counts), abs=1e-5)


def test_chat_template_missing(tiny):
    _, _, model, tok = tiny
    with pytest.raises(ValueError, match="has no chat template"):
        ExamplesObjective(model, tok, EXAMPLES, chat_template=True)


def test_through_a_mixture_equals_peft(tiny):
    """The objective sees a LoraMixture's hooks; a PeftModel (no plain decoder body) falls back to full logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, adapter, model, tok = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
        )
    losses, counts = hf_losses(peft.eval(), plain_pairs(tok, EXAMPLES))
    with pytest.warns(UserWarning, match="full logits"):
        assert ExamplesObjective(peft, tok, EXAMPLES)() == pytest.approx(pooled(losses, counts), abs=1e-5)
    objective = ExamplesObjective(model, tok, EXAMPLES)
    base_value = objective()
    with LoraMixture.from_peft(model, {"ad": adapter}) as mix:
        assert objective() == base_value  # coefficients start at 0
        mix.set([1.0])
        assert objective() == pytest.approx(pooled(losses, counts), abs=1e-5)
    assert objective() == base_value


def test_bad_examples(tiny):
    _, _, model, tok = tiny
    with pytest.raises(ValueError, match="at least one example"):
        ExamplesObjective(model, tok, [])
    with pytest.raises(ValueError, match="example 1: the output tokenizes to nothing"):
        ExamplesObjective(model, tok, [("a", "b"), ("a", "")])


# ----------------------------------------------------------------------------------------------------------
# load_examples


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "examples.jsonl"
    path.write_text(text, encoding="utf-8")
    return path


def test_load_examples(tmp_path):
    lines = [json.dumps({"input": "a", "output": "b", "id": 1}), "", json.dumps({"input": "", "output": "ç"})]
    assert load_examples(write(tmp_path, "\n".join(lines) + "\n")) == [("a", "b"), ("", "ç")]


@pytest.mark.parametrize(
    "text, message",
    [
        (
            '{"input": "a", "output": "b"}\n\n{"input": "a", "output": \n',
            r"examples\.jsonl:3: not valid JSON",
        ),
        ('{"input": "a", "output": "b"}\n["a", "b"]\n', r":2: expected a JSON object"),
        ('{"input": "a"}\n', r":1: 'output' must be a string, got None"),
        ('{"input": 1, "output": "b"}\n', r":1: 'input' must be a string"),
        ('{"input": "a", "output": ""}\n', r":1: 'output' is empty"),
        ("\n  \n", "no examples"),
        ("", "no examples"),
    ],
)
def test_load_examples_errors(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_examples(write(tmp_path, text))


def test_load_examples_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="examples file not found"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(IsADirectoryError):
        load_examples(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9", "output": "x"}\n')
    with pytest.raises(UnicodeDecodeError):
        load_examples(tmp_path / "latin1.jsonl")
