"""Score candidates on one resident base model, exactly and without re-merging from disk.

Two ways to make the resident model compute a candidate, chosen once per search (:func:`open_scorer`):

- ``mixture`` (linear / task_arithmetic / cat, plain LoRA sources, an output that keeps the exact sum): every
  source stays attached through :class:`loracook.mixture.LoraMixture`, and a candidate only sets per-module
  coefficients, so the forward pass computes y = W x + Σ_i w_i s_i B_i A_i x. That is the merged model exactly
  (no cross terms B_i A_j), and nothing is merged at all.
- ``executed`` (element-wise methods such as ties and dare_*, sources with modules_to_save, DoRA, lora_bias or
  per-source DARE, adapter outputs recompressed to merge.rank): the compiled plan, restricted to the tasks that
  have terms, is executed into a :class:`~loracook.execute.sinks.MemorySink` with the candidate's values and
  the result is copied into the resident model's parameters. The candidate is then exactly what
  ``loracook run`` would write with those weights (adapter outputs: the base plus each module's B @ A).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from loracook.errors import BadInput
from loracook.plan.tasks import ModuleTask, Plan, TensorTask
from loracook.plan.values import Values


@dataclass(frozen=True)
class Scored:
    """One candidate's raw objective values and where its time went."""

    values: list[float]
    apply_seconds: float  # setting coefficients, or executing the plan and copying
    objective_seconds: float  # the objective's forward passes


def mixture_refusal(plan: Plan, sources: dict) -> str | None:
    """Why the mixture cannot stand for this plan's output (None: it can, exactly)."""
    from loracook.mixture import load_peft_factors

    method = plan.combine.method
    if not method.exact:
        return f"method {method.name} is not a weighted sum of the deltas"
    if any(isinstance(t, ModuleTask) and not t.exact for t in plan.tasks):
        return "merge.rank recompresses the adapter output"
    for name, source in sources.items():
        if source.dare is not None:
            return f"source {name!r} has per-source DARE"
        try:
            load_peft_factors(source.adapter.path)
        except ValueError as exc:
            return f"source {name!r}: {str(exc).split(': ', 1)[-1]}"
    return None


class Scorer:
    """The resident model, the objective, and how a candidate's values reach the model."""

    how: str = ""
    reason: str | None = None

    def __init__(self, model, objective) -> None:
        self.model, self.objective = model, objective

    def apply(self, values: Values) -> None:
        raise NotImplementedError

    def score(self, values: Values) -> Scored:
        start = time.perf_counter()
        self.apply(values)
        applied = time.perf_counter()
        result = self.objective()
        return Scored(list(result), applied - start, time.perf_counter() - applied)

    def close(self) -> None:
        pass


class MixtureScorer(Scorer):
    """Every source attached once; a candidate sets coefficients (per module, from the plan's weight rule)."""

    how = "mixture"

    def __init__(self, model, objective, sources: dict) -> None:
        from loracook.mixture import LoraMixture

        super().__init__(model, objective)
        self.names = tuple(sources)
        folders = {name: source.adapter.path for name, source in sources.items()}
        self.mixture = LoraMixture.from_peft(model, folders).attach()

    def apply(self, values: Values) -> None:
        # The key of a hooked module is the merged tensor's module (the embedding for a tied output head), so
        # the coefficient is exactly the weight the plan gives that tensor.
        self.mixture.set(None, per_module=lambda key: [values.weight(s, f"{key}.weight") for s in self.names])

    def close(self) -> None:
        self.mixture.detach()


class ExecutedScorer(Scorer):
    """Execute the compiled plan into memory with the candidate's values and copy it into the model."""

    how = "executed"

    def __init__(self, model, objective, plan: Plan, reason: str | None = None) -> None:
        super().__init__(model, objective)
        self.reason = reason
        self.plan = replace(plan, tasks=tuple(t for t in plan.tasks if t.terms))
        self.params = _parameters(model)
        self.fifo = bool((plan.adapter_config or {}).get("fan_in_fan_out", False))
        self.originals: dict[str, torch.Tensor] = {}
        for task in self.plan.tasks:  # adapter outputs add B @ A to the base: keep the base tensors
            if isinstance(task, ModuleTask):
                name = f"{task.module}.weight"
                self.originals[name] = self._param(name).detach().clone()
        # The last candidate's output tensors, as `loracook run` would write them.
        self.tensors: dict[str, torch.Tensor] = {}

    def apply(self, values: Values) -> None:
        from loracook.execute.executor import execute
        from loracook.execute.sinks import MemorySink

        sink = MemorySink()
        execute(self.plan, values, sink)
        self.tensors = sink.tensors
        with torch.no_grad():
            for task in self.plan.tasks:
                if isinstance(task, ModuleTask):
                    self._add_factors(task)
                elif isinstance(task, TensorTask):
                    self._param(task.name).copy_(self.tensors[task.out_name or task.name])

    def _add_factors(self, task: ModuleTask) -> None:
        name_a, name_b = task.names
        delta = self.tensors[name_b].float() @ self.tensors[name_a].float()  # written at scale 1
        if task.kind == "embedding" or self.fifo:
            delta = delta.t()
        weight = f"{task.module}.weight"
        self._param(weight).copy_(self.originals[weight] + delta.to(self.originals[weight].dtype))

    def _param(self, name: str) -> torch.Tensor:
        param = self.params.get(name)
        if param is None:
            raise RuntimeError(
                f"the resident model has no parameter {name!r} (names: {list(self.params)[:3]}…)"
            )
        return param


def _parameters(model) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def open_scorer(plan: Plan, sources: dict, checked, chat_template: bool, device: str = "cpu") -> Scorer:
    """Load the base once and bind the objective to it; the mixture where it is exact, else the executor."""
    from loracook.evaluation import load_model
    from loracook.search.objectives import build_objective

    loaded = load_model(plan.base.path, device=device)
    model = loaded.model.requires_grad_(False)
    reason = mixture_refusal(plan, sources)
    try:
        objective = build_objective(checked, model, loaded.tokenizer, chat_template)
    except ValueError as exc:  # the tokenizer cannot render the examples (chat template, empty inputs)
        raise BadInput(
            f"cannot score the examples: {exc}", loc=("search", "objective"), fix="check the examples file"
        ) from None
    if reason is None:
        return MixtureScorer(model, objective, sources)
    return ExecutedScorer(model, objective, plan, reason)
