"""The few-shot examples objective of a weight search (LoraHub-style): cross-entropy of the wanted outputs.

``ExamplesObjective(model, tokenizer, examples)()`` is the mean cross-entropy, in nats, over **all output tokens
of all examples pooled** (token-weighted: an example with 20 output tokens weighs twice one with 10). That is
what LoraHub computes with its default single batch (the HF causal-LM loss over every target token of the
batch); LoraHub then divides by the number of examples, a constant factor we drop, and with several batches it
sums per-batch means, which makes its value depend on the batch size; ours does not depend on batching.

It is the inner loop of a search (one call per candidate), so everything that does not depend on the weights is
done once: tokenization, length-sorted batches padded to their longest member, and the flat positions whose
next token is an output token. A call runs only the decoder body, applies the output head to those positions
alone (never full-vocabulary logits at every position), and takes log_softmax over the gathered rows.

    >>> objective = ExamplesObjective(model, tokenizer, load_examples("data/fewshot.jsonl"))  # doctest: +SKIP
    >>> with LoraMixture(model, sources) as mix:                                            # doctest: +SKIP
    ...     mix.set([0.5, 1.0]); loss = objective()
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ExamplesObjective", "load_examples"]


def load_examples(path: str | Path) -> list[tuple[str, str]]:
    """``(input, output)`` pairs from a JSONL file of ``{"input": str, "output": str}`` lines (blank lines are
    skipped; other keys are allowed). Raises FileNotFoundError for a missing file, IsADirectoryError for a
    folder, UnicodeDecodeError for a file that is not UTF-8, and ValueError "<path>:<line>: problem" for a
    malformed line or "<path>: no examples" for a file without any."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a folder, not a JSONL examples file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: examples file not found")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                examples.append(_parse_line(line, path, number))
    if not examples:
        raise ValueError(f'{path}: no examples (expected JSONL lines like {{"input": ..., "output": ...}})')
    return examples


def _parse_line(line: str, path: Path, number: int) -> tuple[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: expected a JSON object with 'input' and 'output'")
    for key in ("input", "output"):
        if not isinstance(record.get(key), str):
            raise ValueError(f"{path}:{number}: {key!r} must be a string, got {record.get(key)!r}")
    if not record["output"]:
        raise ValueError(f"{path}:{number}: 'output' is empty (there would be nothing to score)")
    return record["input"], record["output"]


# ----------------------------------------------------------------------------------------------------------
# Tokenization


def _token_pairs(
    tokenizer: Any, examples: Sequence[tuple[str, str]], chat_template: bool, eos: bool
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, output ids) per example; the output ids are the scored tokens."""
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template=True but the tokenizer ({type(tokenizer).__name__}) has no chat template; "
            "pass chat_template=False to score input + output as plain text"
        )
    pairs = [
        _chat_pair(tokenizer, i, o) if chat_template else _plain_pair(tokenizer, i, o) for i, o in examples
    ]
    if eos and not chat_template:
        if tokenizer.eos_token_id is None:
            raise ValueError("eos=True but the tokenizer has no eos_token_id")
        pairs = [(p, [*o, tokenizer.eos_token_id]) for p, o in pairs]
    for index, (prompt, output) in enumerate(pairs):
        if not prompt:
            raise ValueError(
                f"example {index}: the input tokenizes to nothing, so no token predicts the output"
            )
        if not output:
            raise ValueError(f"example {index}: the output tokenizes to nothing")
    return pairs


def _plain_pair(tokenizer: Any, prompt: str, output: str) -> tuple[list[int], list[int]]:
    """Input with the tokenizer's special tokens (a BOS where it adds one), output appended as is: tokenized on
    its own so the boundary is exact; put any separator (space, newline) in the texts themselves."""
    return (
        list(tokenizer(prompt, add_special_tokens=True)["input_ids"]),
        list(tokenizer(output, add_special_tokens=False)["input_ids"]),
    )


def _chat_pair(tokenizer: Any, prompt: str, output: str) -> tuple[list[int], list[int]]:
    """The input as a user turn plus the generation prompt; the output is what the template renders after it
    for the assistant reply (the reply and its end-of-turn marker, trailing whitespace dropped)."""
    user = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": output}], tokenize=False)
    if not full.startswith(head):
        raise ValueError(
            "the chat template does not render the conversation as the generation prompt followed by the reply "
            "(it rewrites earlier turns); use chat_template=False and format the examples yourself"
        )
    return (
        list(tokenizer(head, add_special_tokens=False)["input_ids"]),
        list(tokenizer(full[len(head) :].rstrip(), add_special_tokens=False)["input_ids"]),
    )


# ----------------------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class _Batch:
    """Right-padded ids; rows of the flattened hidden states that predict an output token, their targets, and
    the example each belongs to. Right padding needs no attention mask: causal attention never lets a real
    token see the padding after it, so the pad value is irrelevant (we repeat each row's last token)."""

    ids: Tensor  # [b, L]
    positions: Tensor  # [N] flat indices into b * L
    targets: Tensor  # [N]
    example: Tensor  # [N] index of the example in the caller's order


def _batches(
    pairs: list[tuple[list[int], list[int]]], batch_tokens: int, device: torch.device
) -> list[_Batch]:
    """Sort by length (longest first) and fill each batch while rows × longest length stays ≤ batch_tokens."""
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    groups: list[list[int]] = []
    for index in order:
        if groups:
            longest = len(pairs[groups[-1][0]][0]) + len(pairs[groups[-1][0]][1])
            if (len(groups[-1]) + 1) * longest <= batch_tokens:
                groups[-1].append(index)
                continue
        groups.append([index])
    return [_make_batch(pairs, group, device) for group in groups]


def _make_batch(pairs: list[tuple[list[int], list[int]]], group: list[int], device: torch.device) -> _Batch:
    rows = [pairs[i][0] + pairs[i][1] for i in group]
    width = max(len(row) for row in rows)
    ids = torch.tensor([row + [row[-1]] * (width - len(row)) for row in rows], dtype=torch.long)
    positions, targets, example = [], [], []
    for r, i in enumerate(group):
        prompt, output = pairs[i]
        start = r * width + len(prompt) - 1  # the position whose logits predict the first output token
        positions.extend(range(start, start + len(output)))
        targets.extend(output)
        example.extend([i] * len(output))
    as_long = lambda v: torch.tensor(v, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(ids.to(device), as_long(positions), as_long(targets), as_long(example))


# ----------------------------------------------------------------------------------------------------------
# The objective


class ExamplesObjective:
    """Mean cross-entropy (nats per output token, all examples pooled) of ``examples`` under ``model``.

    ``examples`` are (input, output) pairs. With ``chat_template`` the input becomes a user message with the
    generation prompt and the output the assistant reply as the tokenizer's chat template renders it (a
    ValueError if the tokenizer has none). Otherwise the output ids follow the input ids directly; ``eos``
    also scores an end-of-sequence token after the output. ``batch_tokens`` bounds rows × padded length per
    forward pass (memory vs. speed). The model is called as it is at each call, so hooks such as a
    LoraMixture's apply, and its weights may change between calls.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        examples: Sequence[tuple[str, str]],
        chat_template: bool = False,
        batch_tokens: int = 4096,
        *,
        eos: bool = False,
    ):
        if not examples:
            raise ValueError("the objective needs at least one example")
        if batch_tokens < 1:
            raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
        self.model = model
        pairs = _token_pairs(tokenizer, examples, chat_template, eos)
        device = next(model.parameters()).device
        self.batches = _batches(pairs, batch_tokens, device)
        self.n_examples = len(pairs)
        self.n_tokens = sum(len(output) for _, output in pairs)
        self._body, self._head = _split_model(model)
        self._fast = self._body is not None and self._head_matches()

    def __call__(self) -> float:
        """Mean cross-entropy over all output tokens (see the class docstring)."""
        return float(self.nll_sums().sum() / self.n_tokens)

    def per_example(self) -> Tensor:
        """Each example's mean cross-entropy over its own output tokens, in the caller's order ([n_examples])."""
        counts = torch.zeros(self.n_examples, dtype=torch.float64)
        for batch in self.batches:
            counts.index_add_(0, batch.example.cpu(), torch.ones(len(batch.example), dtype=torch.float64))
        return self.nll_sums() / counts

    def nll_sums(self) -> Tensor:
        """Summed negative log-likelihood of each example's output tokens (float64, CPU, [n_examples])."""
        sums = torch.zeros(self.n_examples, dtype=torch.float64, device=self.batches[0].ids.device)
        with torch.inference_mode():
            for batch in self.batches:
                logits = self._logits(batch)
                nll = -torch.log_softmax(logits.float(), dim=-1).gather(1, batch.targets[:, None])[:, 0]
                sums.index_add_(0, batch.example, nll.to(torch.float64))
        return sums.cpu()

    def _logits(self, batch: _Batch) -> Tensor:
        """Logits [N, vocab] at the positions that predict output tokens only."""
        if not self._fast:
            logits = self.model(input_ids=batch.ids, use_cache=False).logits
            return logits.reshape(-1, logits.shape[-1])[batch.positions]
        hidden = self._body(input_ids=batch.ids, use_cache=False)[0]
        return self._head(hidden.reshape(-1, hidden.shape[-1])[batch.positions])

    def _head_matches(self) -> bool:
        """Check once that body + head on the gathered rows reproduces the model's own logits there; models that
        post-process logits (soft-capping, scaling) fall back to full logits with a warning."""
        batch = _last_row(self.batches[-1])  # the shortest example: the check costs little
        with torch.inference_mode():
            full = self.model(input_ids=batch.ids, use_cache=False).logits
            full = full.reshape(-1, full.shape[-1])[batch.positions].float()
            try:
                hidden = self._body(input_ids=batch.ids, use_cache=False)[0]
                fast = self._head(hidden.reshape(-1, hidden.shape[-1])[batch.positions]).float()
            except (RuntimeError, TypeError, ValueError, IndexError):  # not a plain body -> hidden states
                fast = None
        tolerance = 1e-3 * (1.0 + float(full.abs().max()))
        if fast is not None and fast.shape == full.shape and float((fast - full).abs().max()) <= tolerance:
            return True
        warnings.warn(
            f"{type(self.model).__name__}: decoder body + output head do not reproduce the model's logits; "
            "the objective computes full logits instead (slower)",
            stacklevel=3,
        )
        return False


def _last_row(batch: _Batch) -> _Batch:
    """The batch's last row alone (batches are sorted longest first, so it is the shortest example)."""
    rows, width = batch.ids.shape
    mine = batch.positions >= (rows - 1) * width
    return _Batch(
        batch.ids[-1:], batch.positions[mine] - (rows - 1) * width, batch.targets[mine], batch.example[mine]
    )


def _split_model(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The decoder body (``model.model`` for Llama, ``model.transformer`` for GPT-2) and the output head."""
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if body is None or body is model or head is None:
        return None, None
    return body, head
