"""The routing study: do routers keep every skill where static merges lose one? Writes a section of docs/quality.md.

    python scripts/skills/route_study.py             # everything (long on 2 CPU cores: see the doc section)
    python scripts/skills/route_study.py --limit 24  # a quick smoke run on the first 24 items of each set
    python scripts/skills/route_study.py --doc-only  # rewrite the doc section and chart from the saved results

Steps, all offline, on SmolLM2-135M-Instruct with the skill LoRAs of recipes/skills/adapters/:

1. writes the routers' exemplars (recipes/skills/data/exemplars/): up to 64 distinct training prompts per skill
   and the inputs of the search dev split, all disjoint from every test item by construction
   (scripts/skills/make_data.py);
2. builds the routers with `loracook run recipes/skills/route-{centroid,gate,arrow}.yaml` (output kind router)
   and the merges of MERGED (ties and the LoRA-native knots, core_space, tsv) with `loracook run recipes/skills/merge-*.yaml` (out/skills/);
3. scores every candidate on the same items, in the same batches of 32 (formed by prompt length):
   - the mixed set (recipes/skills/data/mixed_test.jsonl, 684 items of the three skills shuffled together:
     kessary as 4-option multiple choice and as recall, json, headline). A candidate sees each item's prompt
     only; the item's skill is used for scoring and, for the oracle, to pick the adapter;
   - the composed task (kessary_json_test.jsonl, 192 items): Kessary questions answered as JSON;
   candidates: the oracle (each item answered by its skill's own adapter), the static merges `ties` (weight 1,
   density 0.5) and `linear` at weight 0.5 (the best two of docs/quality.md, applied exactly through the LoRA
   mixture), and the three routers (each attached to the same base; multiple-choice items are routed on
   the question alone and every option is scored with those weights, as `loracook eval` does);
   scoring follows the lm-eval task files in recipes/skills/tasks/ (greedy, cut at the first newline,
   lm-eval's own exact_match with the same options; acc for multiple choice); ± is the standard error of
   the mean over items, as lm-eval reports it;
4. writes recipes/skills/route_results.json, docs/quality_routing.png and the routing section of
   docs/quality.md (between the `routing study` markers; the rest of the page is study.py's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TQDM_DISABLE", "1")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SKILLS_DIR = ROOT / "recipes" / "skills"
DATA = SKILLS_DIR / "data"
OUT = ROOT / "out" / "skills"
RESULTS = SKILLS_DIR / "route_results.json"
PARTIAL = OUT / "route_study_partial.json"  # per-candidate results of an unfinished run (--resume)
DOC = ROOT / "docs" / "quality.md"
CHART = ROOT / "docs" / "quality_routing.png"
BEGIN, END = "<!-- routing study: begin (scripts/skills/route_study.py) -->", "<!-- routing study: end -->"
sys.path.insert(0, str(ROOT))

SKILLS = ("kessary", "json", "headline")
SEARCH = OUT / "search-tasks" / "search" / "best.yaml"  # by `loracook run recipes/skills/search-tasks.yaml`
EXEMPLARS = 64
BATCH = 32
# task -> (label, skill, new tokens, lm-eval exact_match options); kessary_choice is scored by loglikelihood
TASKS = {
    "kessary_choice": ("kessary facts", "kessary", 0, None),
    "kessary_open": ("kessary recall", "kessary", 8,
                     {"ignore_case": True, "ignore_punctuation": True, "regexes_to_ignore": ["^in the ", "^the "]}),
    "json": ("json format", "json", 16, {}),
    "headline": ("headline style", "headline", 20, {}),
    "kessary_json": ("kessary in json", None, 16, {}),
}  # fmt: skip
ROUTERS = ("centroid", "gate", "arrow")
# merges written as adapters by `loracook run recipes/skills/<recipe>.yaml` (into out/skills/), scored at weight 1
MERGED = {"ties": "merge-ties", "knots": "merge-knots", "core_space": "merge-core-space", "tsv": "merge-tsv"}
# name -> (what it is, kind)
CANDIDATES = {
    "oracle": ("each item answered by its skill's own adapter (uses the skill label)", "oracle"),
    "ties": ("ties, weight 1, density 0.5, rank 24 (the best static merge at full weight)", "merge"),
    "linear_half": ("linear, weight 0.5 each (exact; the best static merge at half weight)", "merge"),
    "knots": (
        "knots (ties inner, density 0.5), weight 1, rank ≤ 24 (LoRA-native: shared SVD basis)",
        "merge",
    ),
    "core_space": ("core_space (ties inner, density 0.5), weight 1 (LoRA-native: 24 × 24 cores)", "merge"),
    "tsv": ("tsv, weight 1, top 8 singular vectors per skill, decorrelated (LoRA-native)", "merge"),
    "search": (
        "linear with the weights the weight search found (recipes/skills/search-tasks.yaml; exact)",
        "merge",
    ),
    "centroid": ("router: centroid of the exemplar embeddings, top-1", "router"),
    "gate": ("router: 2-layer MLP gate on the exemplar embeddings, top-1", "router"),
    "arrow": ("router: Arrow, per token and module, softmax over all 3 (PEFT's top_k 3), T = 1", "router"),
    "kessary_json": ("the LoRA trained on the composed task (reference for kessary in json)", "oracle"),
}


def log(message: str) -> None:
    print(message, flush=True)


# ------------------------------------------------------------------------------------------------- inputs


def write_exemplars() -> dict[str, Path]:
    """Per skill: up to 64 distinct non-empty training prompts (sampled with a fixed seed), plus the inputs of
    the search dev split (search_dev_<skill>.jsonl, written by make_data.py: in the test items' format but
    disjoint from them), when it exists. Never a test item."""
    folder = DATA / "exemplars"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for skill in SKILLS:
        rows = [json.loads(line) for line in (DATA / f"{skill}_train.jsonl").read_text().splitlines()]
        prompts = sorted({r["prompt"] for r in rows if r["prompt"].strip()})
        chosen = sorted(random.Random(f"exemplars:{skill}").sample(prompts, min(EXEMPLARS, len(prompts))))
        dev = DATA / f"search_dev_{skill}.jsonl"
        if dev.is_file():
            chosen += [json.loads(line)["input"] for line in dev.read_text().splitlines() if line.strip()]
        out[skill] = folder / f"{skill}.jsonl"
        out[skill].write_text("".join(json.dumps({"prompt": p}) + "\n" for p in chosen))
    return out


def build(reuse: bool) -> dict[str, Path]:
    """Run the router recipes and the merges of MERGED through the CLI (`loracook run`), into out/skills/."""
    from loracook.cli import main

    jobs = {m: f"route-{m}" for m in ROUTERS}
    jobs.update(MERGED)
    outputs = {}
    for name, recipe in jobs.items():
        target = OUT / f"route-{name}" if name in ROUTERS else OUT / recipe.removeprefix("merge-")
        outputs[name] = target
        if reuse and target.is_dir():
            continue
        started = time.perf_counter()
        args = [
            "run",
            str(SKILLS_DIR / f"{recipe}.yaml"),
            "--output",
            str(target),
            "--force",
            "--no-eval",
            "-q",
        ]
        if main(args) != 0:
            sys.exit(f"loracook run {recipe}.yaml failed")
        log(f"built {target} in {time.perf_counter() - started:.1f} s")
    return outputs


def load_items(limit: int | None) -> dict[str, list[dict]]:
    mixed = [json.loads(line) for line in (DATA / "mixed_test.jsonl").read_text().splitlines()]
    composed = [json.loads(line) for line in (DATA / "kessary_json_test.jsonl").read_text().splitlines()]
    for row in composed:
        row.update(skill=None, task="kessary_json")
    return {"mixed": mixed[:limit], "composed": composed[:limit]}


# ------------------------------------------------------------------------------------------------ scoring


class Scorer:
    """One base model; a candidate is a way to set the LoRA weights per batch (or a router that decides)."""

    def __init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from loracook.evaluation.candidates import load_tokenizer
        from loracook.io.packaged import smollm2_folder

        self.folder = smollm2_folder()
        self.tokenizer = load_tokenizer(self.folder)
        self.model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()

    def run(self, items: list[dict], weights=None, router=None) -> list[dict]:
        """Per item: score (0/1) and, for routers, the top-1 source. ``weights(items) -> [b, n]`` sets a
        static mixture per batch; with ``router`` the router decides (on the question alone for choices)."""
        results: list[dict | None] = [None] * len(items)
        generate = [i for i, item in enumerate(items) if item["task"] != "kessary_choice"]
        # Batches by prompt length (less padding, half the prefill work on this mix); a batch still mixes skills
        # whose prompts are about as long (kessary and headline), and each row is routed on its own anyway.
        generate.sort(key=lambda i: len(items[i]["prompt"]))
        choice = [i for i, item in enumerate(items) if item["task"] == "kessary_choice"]
        for start in range(0, len(generate), BATCH):
            chunk = generate[start : start + BATCH]
            for i, result in zip(
                chunk, self._generate([items[i] for i in chunk], weights, router), strict=True
            ):
                results[i] = result
        for start in range(0, len(choice), BATCH // 4):
            chunk = choice[start : start + BATCH // 4]
            for i, result in zip(
                chunk, self._choose([items[i] for i in chunk], weights, router), strict=True
            ):
                results[i] = result
        return results  # type: ignore[return-value]

    def _generate(self, items: list[dict], weights, router) -> list[dict]:
        import torch
        from lm_eval.api.metrics import exact_match_hf_evaluate

        from loracook.routing.embed import tokenize

        ids, mask = tokenize(self.tokenizer, [item["prompt"] for item in items], "cpu")
        if weights is not None:
            weights.set(items)
        steps = max(TASKS[item["task"]][2] for item in items)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                stopping_criteria=[self._newline_stop(ids.shape[1])], pad_token_id=self.tokenizer.pad_token_id,
            )  # fmt: skip
        tops = self._tops(router, len(items))
        results = []
        for row, item in enumerate(items):
            _, _, limit, options = TASKS[item["task"]]
            new = out[row, ids.shape[1] : ids.shape[1] + limit]
            text = self.tokenizer.decode(new, skip_special_tokens=True).split("\n")[0].strip()
            score = exact_match_hf_evaluate(predictions=[text], references=[item["answer"]], **options)
            results.append({"score": float(score["exact_match"]), "top": tops[row], "output": text})
        return results

    def _newline_stop(self, start: int):
        """Stop a row once it has produced a token holding a newline (lm-eval's `until: ["\\n"]`): the text
        before the newline is all that is scored, and greedy rows do not depend on each other."""
        import torch
        from transformers import StoppingCriteria

        if not hasattr(self, "_newlines"):
            vocab = range(len(self.tokenizer))
            texts = self.tokenizer.batch_decode([[i] for i in vocab])
            self._newlines = torch.tensor([i for i, t in zip(vocab, texts, strict=True) if "\n" in t])

        newlines = self._newlines

        class Newline(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return torch.isin(input_ids[:, start:], newlines).any(dim=1)

        return Newline()

    def _choose(self, items: list[dict], weights, router) -> list[dict]:
        """lm-eval's multiple choice (acc): the summed log-probability of each option's tokens after the
        question, the same tokenization (continuation = tokens of question + " " + option after the
        question's). The question runs once; its KV cache is shared by the four options."""
        import torch

        contexts = [item["prompt"] for item in items]
        if router is not None:
            chosen = router.weights(contexts, batch_size=len(contexts))  # routed on the question alone
            tops = [router.names[int(w.argmax())] for w in chosen]
        else:
            chosen, tops = weights.matrix(items), [None] * len(items)
        tok = self.tokenizer
        context_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
        continuations = []
        for item, context in zip(items, context_ids, strict=True):
            for option in item["choices"]:
                whole = tok(item["prompt"] + " " + option, add_special_tokens=False)["input_ids"]
                continuations.append(whole[len(context) :])
        longest = max(len(c) for c in context_ids)
        ids = torch.full((len(items), longest), tok.pad_token_id or 0)
        mask = torch.zeros_like(ids)
        for r, context in enumerate(context_ids):
            ids[r, longest - len(context) :] = torch.tensor(context)
            mask[r, longest - len(context) :] = 1
        width = max(len(c) for c in continuations)
        cont = torch.full((len(continuations), width), tok.pad_token_id or 0)
        for r, tokens in enumerate(continuations):
            cont[r, : len(tokens)] = torch.tensor(tokens)
        options = len(items[0]["choices"])
        full_mask = torch.cat([mask.repeat_interleave(options, dim=0), torch.ones_like(cont)], dim=1)
        lengths = mask.sum(dim=1).repeat_interleave(options)
        stacked = torch.as_tensor(chosen, dtype=torch.float32)
        if router is None:
            pinned = _set(weights.mixture, stacked)
        elif (
            router.method == "arrow"
        ):  # per token and causal: the scoring passes are what generation computes
            pinned = contextlib.nullcontext()
        else:  # pinned for both passes; the mixture repeats each row for the options of its question
            pinned = router.fixed(stacked)
        with torch.inference_mode(), pinned:
            first = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                use_cache=True,
            )
            cache = first.past_key_values
            cache.batch_repeat_interleave(options)
            rest = self.model(
                input_ids=cont, attention_mask=full_mask, cache=cache,
                position_ids=lengths[:, None] + torch.arange(width)[None, :],
            )  # fmt: skip
        head = torch.log_softmax(first.logits[:, -1].float(), dim=-1).repeat_interleave(options, dim=0)
        tail = torch.log_softmax(rest.logits.float(), dim=-1)
        totals = []
        for r, tokens in enumerate(continuations):
            total = float(head[r, tokens[0]])
            total += sum(float(tail[r, j - 1, tokens[j]]) for j in range(1, len(tokens)))
            totals.append(total)
        results = []
        for index, item in enumerate(items):
            scores = totals[options * index : options * (index + 1)]
            best = max(range(options), key=lambda j: scores[j])
            results.append(
                {
                    "score": float(best == item["answer"]),
                    "top": tops[index],
                    "output": best,
                    "logprobs": scores,
                }
            )
        return results

    @staticmethod
    def _tops(router, n: int) -> list:
        if router is None:
            return [None] * n
        return [router.names[int(w.argmax())] for w in router.last_weights]


@contextlib.contextmanager
def _set(mixture, weights):
    """Per-row weights on a static mixture for the duration of a block (the repeat per option is the
    mixture's: rows follow the batch when it grows by a whole factor)."""
    mixture.set(weights)
    yield


class Static:
    """Fixed LoRA weights on a mixture of adapters: one vector for every item, or the item's own skill."""

    def __init__(
        self, scorer: Scorer, adapters: dict[str, Path], vector=None, by_skill: bool = False
    ) -> None:
        from loracook.mixture import LoraMixture

        self.names = tuple(adapters)
        self.mixture = LoraMixture.from_peft(scorer.model, adapters).attach()
        self.vector, self.by_skill = vector, by_skill

    def matrix(self, items: list[dict]):
        import torch

        rows = []
        for item in items:
            if self.by_skill:
                rows.append([float(name == item["skill"]) for name in self.names])
            else:
                rows.append(list(self.vector))
        return torch.tensor(rows, dtype=torch.float32)

    def set(self, items: list[dict]) -> None:
        self.mixture.set(self.matrix(items))


def search_weights() -> list[float] | None:
    """The weights of the weight search's result (its best.yaml), when that run is on disk."""
    if not SEARCH.is_file():
        return None
    import yaml

    weights = yaml.safe_load(SEARCH.read_text())["merge"]["weights"]
    return [float(weights[s]) for s in SKILLS]


def evaluate(
    scorer: Scorer, outputs: dict[str, Path], items: dict[str, list[dict]], names, done=None
) -> dict:
    """The candidates on the mixed set and the composed task: per-item scores and routing decisions. Each
    candidate's results are saved to PARTIAL as soon as they are complete; ``done`` (from PARTIAL) is kept."""
    from loracook.routing.model import attach_router

    adapters = {s: SKILLS_DIR / "adapters" / s for s in SKILLS}
    per: dict[str, dict] = dict(done or {})
    for name in names:
        if name in per:
            log(f"{name}: kept from {PARTIAL}")
            continue
        started = time.perf_counter()
        sets = ("composed",) if name == "kessary_json" else ("mixed", "composed")
        per[name] = {}
        if name in ROUTERS:
            router = attach_router(scorer.model, outputs[name], tokenizer=scorer.tokenizer)
            try:
                for which in sets:
                    per[name][which] = scorer.run(items[which], router=router)
            finally:
                router.detach()
        else:
            if name == "oracle":
                static = Static(scorer, adapters, by_skill=True)
            elif name in MERGED:  # a merged adapter written by `loracook run`, applied at weight 1
                static = Static(scorer, {name: outputs[name]}, vector=[1.0])
            elif name == "linear_half":
                static = Static(scorer, adapters, vector=[0.5, 0.5, 0.5])
            elif name == "search":
                static = Static(scorer, adapters, vector=search_weights())
            else:
                static = Static(scorer, {name: SKILLS_DIR / "adapters" / name}, vector=[1.0])
            try:
                for which in sets:
                    run = items[which]
                    if name == "oracle" and which == "composed":  # no skill label: the oracle is kessary_json
                        continue
                    per[name][which] = scorer.run(run, weights=static)
            finally:
                static.mixture.detach()
        per[name]["seconds"] = round(time.perf_counter() - started, 1)
        log(f"{name}: {summary_line(per[name], items)} ({per[name]['seconds']} s)")
        PARTIAL.write_text(json.dumps({"items": items, "per": per}) + "\n")
    return per


# ------------------------------------------------------------------------------------------------ numbers


def mean_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def scores(per: dict, items: dict, name: str) -> dict[str, tuple[float, float, int]]:
    """task -> (score, stderr, items) for a candidate."""
    out = {}
    for which, results in per[name].items():
        if which == "seconds":
            continue
        for task in TASKS:
            values = [
                r["score"] for r, item in zip(results, items[which], strict=True) if item["task"] == task
            ]
            if values:
                out[task] = (*mean_stderr(values), len(values))
    return out


def routing_accuracy(per: dict, items: dict, name: str) -> dict[str, tuple[float, float, int]]:
    """skill -> share of that skill's prompts whose top-1 source is the skill's own adapter (recall prompts;
    the multiple-choice prompts are the same questions)."""
    results = per[name].get("mixed")
    out = {}
    if results is None:
        return out
    for skill in SKILLS:
        values = [
            float(r["top"] == skill)
            for r, item in zip(results, items["mixed"], strict=True)
            if item["skill"] == skill and item["task"] != "kessary_choice" and r["top"] is not None
        ]
        if values:
            out[skill] = (*mean_stderr(values), len(values))
    return out


def retention(mine, own):
    if mine is None or own is None or not own[0]:
        return None
    ratio = mine[0] / own[0]
    rel = math.hypot(mine[1] / mine[0] if mine[0] else 0.0, own[1] / own[0])
    return ratio, ratio * rel


def summary_line(result: dict, items: dict) -> str:
    parts = []
    for which, rows in result.items():
        if which == "seconds":
            continue
        for task in TASKS:
            values = [r["score"] for r, item in zip(rows, items[which], strict=True) if item["task"] == task]
            if values:
                parts.append(f"{task} {sum(values) / len(values):.3f}")
    return ", ".join(parts)


def composed_choices(per: dict, items: dict, name: str) -> dict[str, int]:
    results = per[name].get("composed") or []
    counts: dict[str, int] = {}
    for r in results:
        if r["top"] is not None:
            counts[r["top"]] = counts.get(r["top"], 0) + 1
    return counts


# ---------------------------------------------------------------------------------------------------- doc


def fmt(value) -> str:
    return "–" if value is None else f"{value[0]:.3f} ± {value[1]:.3f}"


def fmt_ratio(value) -> str:
    return "–" if value is None else f"{value[0]:.2f} ± {value[1]:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|---|" + "---:|" * (len(header) - 1),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def section(results: dict) -> str:
    per, items = results["per"], results["items"]
    four = ("kessary_choice", "kessary_open", "json", "headline")
    all_scores = {name: scores(per, items, name) for name in per}
    own = all_scores["oracle"]
    lines = [BEGIN, "", "## Routing: a router instead of a merge", ""]
    lines += [
        "`scripts/skills/route_study.py` scores three routers (docs/routing.md) against the oracle, the best "
        "static merges of the tables above, the weight search's result (docs/search.md) and the LoRA-native "
        "merges `knots`, `core_space` and `tsv` (docs/merge-methods.md), all on the **same items in the same "
        "mixed batches**: the mixed test set "
        f"(`recipes/skills/data/mixed_test.jsonl`, {len(items['mixed'])} items of the three skills shuffled "
        "together; a candidate sees only the prompt) and the composed task (Kessary questions answered as JSON, "
        f"{len(items['composed'])} items). The held-out tests are larger than in the tables above: 150 new items "
        "each for json and headline, and, since the kessary adapter fixes its 48 facts, each fact asked in four "
        "phrasings that training never uses (192 items). The exemplars of the centroid and gate routers "
        "(`recipes/skills/data/exemplars/`) are training prompts and the inputs of the search dev split; "
        "nothing was tuned on test items.",
        "",
        "![routers against the oracle and the static merges](quality_routing.png)",
        "",
        "### Scores on the mixed set (value ± stderr)",
        "",
    ]
    header = ["candidate", "what it is", *(TASKS[t][0] for t in four), "kessary in json"]
    rows = []
    for name, (label, _) in CANDIDATES.items():
        if name not in per:
            continue
        if name == "search":
            label += " = " + ", ".join(
                f"{s} {w:.2f}" for s, w in zip(SKILLS, results["search_weights"], strict=True)
            )
        got = all_scores[name]
        rows.append([f"`{name}`", label, *(fmt(got.get(t)) for t in four), fmt(got.get("kessary_json"))])
    lines += table(header, rows)
    lines += ["", "### Retention (÷ the oracle, the skill's own adapter) and routing accuracy", ""]
    header = ["candidate", *(f"{TASKS[t][0]} ÷ own" for t in four), "mean of the 3 skills", "worst skill",
              *(f"routed to `{s}` (top-1)" for s in SKILLS)]  # fmt: skip
    rows = []
    for name in CANDIDATES:
        if name in ("oracle", "kessary_json") or name not in per:
            continue
        got = all_scores[name]
        ratios = {t: retention(got.get(t), own.get(t)) for t in four}
        three = [ratios[t][0] for t in ("kessary_choice", "json", "headline") if ratios[t] is not None]
        accuracy = routing_accuracy(per, items, name)
        rows.append([
            f"`{name}`", *(fmt_ratio(ratios[t]) for t in four),
            f"{sum(three) / len(three):.2f}" if len(three) == 3 else "–",
            f"{min(three):.2f}" if len(three) == 3 else "–",
            *(fmt(accuracy.get(s)) if s in accuracy else "–" for s in SKILLS),
        ])  # fmt: skip
    lines += table(header, rows)
    lines += [
        "",
        "Composed task: which adapter each router chose for the Kessary-in-JSON questions (top-1 counts): ",
    ]
    lines.append(
        "; ".join(
            f"`{r}` " + ", ".join(f"{k} {v}" for k, v in sorted(composed_choices(per, items, r).items()))
            for r in ROUTERS
        )
        + "."
    )
    lines += ["", *results.get("findings", []), ""]
    lines += [
        f"_Greedy decoding, batches of {BATCH} formed by prompt length (they mix skills), {results['machine']}; "
        "wall time per "
        "candidate: " + ", ".join(f"`{n}` {per[n]['seconds']:.0f} s" for n in per) + "._",
        "",
        END,
    ]
    return "\n".join(lines)


def findings(results: dict) -> list[str]:
    """Statements computed from the numbers (the doc's conclusions are only these)."""
    per, items = results["per"], results["items"]
    own = scores(per, items, "oracle")
    out = ["### Findings (computed from the numbers above)", ""]
    best_name, best_worst = None, -1.0
    worsts: dict[str, float] = {}
    means: dict[str, float] = {}
    for name in CANDIDATES:
        if name in ("oracle", "kessary_json") or name not in per:
            continue
        got = scores(per, items, name)
        ratios = [retention(got.get(t), own.get(t)) for t in ("kessary_choice", "json", "headline")]
        if any(r is None for r in ratios):
            continue
        worst = min(r[0] for r in ratios)
        mean = sum(r[0] for r in ratios) / 3
        weakest = ("kessary facts", "json format", "headline style")[[r[0] for r in ratios].index(worst)]
        out.append(f"- `{name}`: mean retention {mean:.2f}, worst skill {weakest} at {worst:.2f}.")
        worsts[name], means[name] = worst, mean
        if worst > best_worst:
            best_name, best_worst = name, worst
    merges = {n: w for n, w in worsts.items() if CANDIDATES[n][1] == "merge"}
    if merges:
        top = max(merges, key=lambda n: (merges[n], means[n]))
        out.append(
            f"- Best static merge (one adapter for every prompt): `{top}`, worst skill {merges[top]:.2f}, mean "
            f"{means[top]:.2f}."
        )
    verdict = "is met" if best_worst >= 0.95 else f"is missed by {0.95 - best_worst:.2f}"
    out.append(
        f"- Best worst-skill retention: `{best_name}` at {best_worst:.2f}; the goal (≥ 0.95 on every skill) "
        f"{verdict}."
    )
    composed = {n: scores(per, items, n).get("kessary_json") for n in CANDIDATES if n in per}
    reference = composed.get("kessary_json")
    best = max((n for n in composed if n != "kessary_json" and composed.get(n)), key=lambda n: composed[n][0])
    out.append(
        f"- Composed task: the adapter trained for it scores {fmt(reference)}; the best other candidate is "
        f"`{best}` at {fmt(composed[best])}."
    )
    routers = {n: composed[n][0] for n in ROUTERS if composed.get(n)}
    if routers and reference and max(routers.values()) < reference[0] / 2:
        out.append(
            "- No router composes the two skills: each one sends a Kessary question asked for JSON mostly to one "
            "adapter (see the counts above), and a mix of the two adapters does not answer it either "
            f"(best router: {max(routers.values()):.3f})."
        )
    return out


def chart(results: dict, path: Path) -> None:
    from loracook.plots import new_figure, save

    per, items = results["per"], results["items"]
    tasks = ("kessary_choice", "kessary_open", "json", "headline", "kessary_json")
    names = [n for n in CANDIDATES if n in per]
    colours = {"oracle": "#4c72b0", "merge": "#dd8452", "router": "#55a868"}
    figure = new_figure(figsize=(3.0 * len(tasks) + 1.5, 0.36 * len(names) + 1.8), layout="constrained")
    axes = figure.subplots(1, len(tasks), sharey=True)
    for ax, task in zip(axes, tasks, strict=True):
        for y, name in enumerate(names):
            got = scores(per, items, name).get(task)
            if got is None:
                continue
            ax.barh(
                y,
                got[0],
                xerr=got[1],
                color=colours[CANDIDATES[name][1]],
                edgecolor="black",
                lw=0.5,
                capsize=2,
            )
            ax.annotate(f"{got[0]:.2f}", (min(got[0] + got[1], 1.0), y), xytext=(3, 0), textcoords="offset points",
                        va="center", fontsize=7)  # fmt: skip
        ax.set_title(TASKS[task][0], fontsize=9)
        ax.set_xlim(0, 1.18)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    figure.suptitle(
        "SmolLM2-135M-Instruct, mixed test set: oracle, static merges and routers (± stderr)", fontsize=10
    )
    save(figure, path)


def publish(results: dict) -> None:
    results["findings"] = findings(results)
    text = DOC.read_text(encoding="utf-8") if DOC.is_file() else ""
    block = section(results)
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text, encoding="utf-8")
    try:
        chart(results, CHART)
    except Exception as exc:  # noqa: BLE001 - the chart is optional (matplotlib)
        log(f"no chart: {exc}")
    log(f"wrote {DOC} and {CHART}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only the first N items of each set (a smoke run)")
    parser.add_argument("--reuse", action="store_true", help="keep routers and merges already in out/skills/")
    parser.add_argument(
        "--doc-only", action="store_true", help="rewrite the doc section from the saved results"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the candidates an unfinished run completed"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(CANDIDATES),
        help="score these candidates and add them to the saved results",
    )
    args = parser.parse_args()
    if args.doc_only:
        publish(json.loads(RESULTS.read_text()))
        return
    import platform

    import torch

    torch.set_num_threads(args.threads)
    write_exemplars()
    outputs = build(args.reuse)
    items = load_items(args.limit)
    names = [n for n in args.only or CANDIDATES if n != "search" or search_weights() is not None]
    done = None
    if args.resume and PARTIAL.is_file():
        partial = json.loads(PARTIAL.read_text())
        done = partial["per"] if partial["items"] == items else None
    per = evaluate(Scorer(), outputs, items, names, done)
    machine = f"{platform.machine()} CPU, {args.threads} threads, torch {torch.__version__}"
    results = {"per": per, "items": items, "machine": machine, "search_weights": search_weights()}
    if args.only and RESULTS.is_file():
        saved = json.loads(RESULTS.read_text())
        saved["per"].update(per)
        results = {**saved, "search_weights": search_weights()}
    if args.limit is None:
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        publish(results)
    else:
        results["findings"] = findings(results)
        print(section(results))


if __name__ == "__main__":
    main()
