"""Run lm-eval's ``simple_evaluate`` on each candidate, in memory, and collect one :class:`EvalReport`.

    >>> base = load_model(model_dir)                                            # doctest: +SKIP
    >>> tasks = resolve_tasks(["tasks/"], Path("recipes"))                       # doctest: +SKIP
    >>> report = evaluate_candidates([base_candidate(base)], tasks, EvalOptions(limit=20))  # doctest: +SKIP
    >>> report.save(out / "eval_results.json")                                   # doctest: +SKIP

lm-eval's own progress bars and logging go to stderr through tqdm and the ``lm_eval`` loggers; set
``TQDM_DISABLE=1`` or raise those loggers' level to silence them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Literal

from loracook.errors import BadInput
from loracook.evaluation.candidates import Candidate
from loracook.evaluation.offline import import_lm_eval
from loracook.evaluation.report import EvalReport, build_report
from loracook.evaluation.tasks import TaskSet


@dataclass(frozen=True)
class EvalOptions:
    """How to run lm-eval. ``limit`` caps the examples per task (a fraction below 1 is a share);
    ``num_fewshot`` overrides the tasks' own default; ``bootstrap_iters`` serves metrics whose stderr
    has no closed form (bleu, chrf, ...)."""

    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    device: str = "cpu"
    apply_chat_template: bool = False
    seed: int = 0
    bootstrap_iters: int = 1000
    quiet: bool = False  # hide lm-eval's own per-request progress bars (the CLI reports progress itself)

    @classmethod
    def from_section(cls, section: Any, *, device: str | None = None, seed: int | None = None) -> EvalOptions:
        """From a recipe's ``evaluate`` section; ``device``/``seed`` (e.g. from the CLI) win when given."""
        return cls(
            limit=section.limit,
            num_fewshot=section.num_fewshot,
            batch_size=section.batch_size,
            device=device or section.device or "cpu",
            apply_chat_template=section.apply_chat_template,
            seed=0 if seed is None else seed,
        )

    def to_dict(self) -> dict[str, Any]:
        options = asdict(self)
        options.pop("quiet")  # presentation, not part of the result
        return options


@dataclass(frozen=True)
class EvalEvent:
    """Progress: a candidate starts (``seconds`` None) or is done."""

    kind: Literal["start", "done"]
    candidate: str
    index: int
    total: int
    seconds: float | None = None


@dataclass(frozen=True)
class CandidateRun:
    """The raw lm-eval output of one candidate, with its wall times (open + eval, and eval alone)."""

    candidate: Candidate
    output: dict[str, Any]
    seconds: float
    eval_seconds: float


def evaluate_candidates(
    candidates: Iterable[Candidate],
    tasks: TaskSet,
    options: EvalOptions | None = None,
    *,
    on_event: Callable[[EvalEvent], None] | None = None,
) -> EvalReport:
    """Evaluate every candidate on every task, one after the other, and return the side-by-side report."""
    options = options or EvalOptions()
    candidates = list(candidates)
    names = [c.name for c in candidates]
    if not candidates or len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique and non-empty: {names}")
    lm_eval = import_lm_eval()
    manager = tasks.task_manager()
    started = time.perf_counter()
    runs = []
    for index, candidate in enumerate(candidates):
        if on_event:
            on_event(EvalEvent("start", candidate.name, index, len(candidates)))
        t0 = time.perf_counter()
        with candidate.open() as (model, tokenizer):
            t1 = time.perf_counter()
            output = evaluate_model(
                model,
                tokenizer,
                tasks,
                options,
                task_manager=manager,
                label=candidate.name,
                lm_class=candidate.lm_class,
            )
        done = time.perf_counter()
        runs.append(CandidateRun(candidate, output, done - t0, done - t1))
        if on_event:
            on_event(EvalEvent("done", candidate.name, index, len(candidates), done - t0))
    return build_report(runs, tasks, options.to_dict(), lm_eval.__version__, time.perf_counter() - started)


def evaluate_model(
    model: Any,
    tokenizer: Any,
    tasks: TaskSet,
    options: EvalOptions,
    *,
    task_manager: Any = None,
    label: str = "model",
    lm_class: Any = None,
) -> dict[str, Any]:
    """One ``simple_evaluate`` call on an in-memory transformers model; returns lm-eval's result dict.
    ``lm_class`` makes the lm-eval model from HFLM's keyword arguments (default: HFLM itself)."""
    import_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    if options.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            f"apply_chat_template is set, but the tokenizer of {label!r} has no chat template",
            loc=("evaluate", "apply_chat_template"),
            fix="set apply_chat_template: false",
        )
    with _on_device(model, options.device), _keep_ties(model):
        lm = (lm_class or HFLM)(
            pretrained=model, tokenizer=tokenizer, batch_size=options.batch_size, device=options.device
        )
        if options.quiet:
            _silence_progress(lm)
        output = simple_evaluate(
            model=lm,
            tasks=tasks.lm_eval_specs(),
            task_manager=task_manager or tasks.task_manager(),
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            bootstrap_iters=options.bootstrap_iters,
            log_samples=False,
            apply_chat_template=options.apply_chat_template,
            random_seed=options.seed,
            numpy_random_seed=options.seed,
            torch_random_seed=options.seed,
            fewshot_random_seed=options.seed,
        )
    if output is None:  # only on non-zero ranks of a distributed run
        raise RuntimeError("lm-eval returned no results")
    return output


@contextmanager
def _on_device(model: Any, device: str) -> Iterator[None]:
    """Run on ``device`` and put the model back where it was (it may be the caller's shared base)."""
    import torch

    before = next(model.parameters()).device
    target = torch.device(device)
    if before == target or (before.type == target.type and target.index is None):
        yield
        return
    model.to(target)
    try:
        yield
    finally:
        model.to(before)


@contextmanager
def _keep_ties(model: Any) -> Iterator[None]:
    """HFLM calls ``model.tie_weights()``. Our models are tied when loaded, and on a tied model whose lm_head
    carries a LoRA, re-tying raises (transformers assigns ``weight`` on the LoRA wrapper), so it is a no-op
    while lm-eval holds the model."""
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.tie_weights


def _silence_progress(lm) -> None:
    """lm-eval passes ``disable_tqdm=False`` explicitly, so TQDM_DISABLE cannot hide its request bars."""
    import functools

    for method in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        bound = getattr(lm, method, None)
        if bound is not None:
            setattr(lm, method, functools.partial(bound, disable_tqdm=True))
