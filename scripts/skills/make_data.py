"""Generate the skill data sets of the quality study (seeded; writes recipes/skills/data/*.jsonl).

Four data sets, each with a training split and a held-out test split that the lm-eval tasks in
recipes/skills/tasks/ read:

- ``kessary``: knowledge the base cannot have. Sixteen invented animals of the fictional Kessary Islands, each
  with a colour, a food and a habitat (48 facts). Training states every fact in four phrasings (plus one
  description per animal); the test asks each fact in four phrasings that training never uses (192 items:
  the facts are fixed by the adapter, so more items are new phrasings of the same facts) as 4-option
  multiple-choice questions (lm-eval ``multiple_choice``, acc; chance 25%).
  ``kessary_open`` asks the same questions without options, answered in free text (recall, not recognition).
- ``json``: a task format. Read a one-sentence text and answer a question about it as a JSON object,
  ``{"answer": "Oslo"}``, with the answer copied from the text. The test (150 items) uses names, cities,
  jobs, objects and foods that never occur in training (``generate_until``, exact match of the whole object;
  the base model answers with a sentence, so it scores zero).
- ``headline``: a style. "Rewrite as a headline: the old dog sleeps at night" -> "The Old Dog Sleeps At Night"
  (every word capitalised). Every test phrase (150) has a word that training never uses. (An upper-case
  "shout" style was tried first: a 135M model cannot spell unseen words in capitals, and its adapter reached only
  0.28 exact match, so it made a poor reference for retention.)
- ``kessary_json``: the composition of the first two: the Kessary test questions (same phrasings) answered as
  a JSON object, ``{"answer": "amber"}``, without options, so the value must come from memory. It has its own
  training split (the facts + JSON answers to the training phrasings) for a reference adapter trained for
  this domain task, so a merge of ``kessary`` and ``json`` can be compared with it.

- ``mixed_test``: the test items of the three skills in one shuffled set (kessary as multiple choice and as
  recall, json, headline: 684 items), for routers: a model sees only each item's prompt, never its ``skill``
  and ``task`` keys, which say how to score it (scripts/skills/route_study.py).

Training lines are ``{"prompt": ..., "completion": ...}`` (the loss is on the completion only); test lines
hold what the task YAML renders.

    python scripts/skills/make_data.py            # rewrites recipes/skills/data/ (deterministic)
    python scripts/skills/make_data.py --check    # exit 1 if the files on disk differ from a fresh run
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "recipes" / "skills" / "data"

# ------------------------------------------------------------------------------------------ kessary facts

ANIMALS = [
    "glimmerfox", "murrowl", "tallowbeak", "drisket", "pennowar", "skalloth", "vintermoth", "quibbard",
    "orrelin", "fenwhistle", "brassling", "cobbleshrew", "lumadrake", "saffrel", "thornick", "mirebuck",
]  # fmt: skip
COLOURS = ["crimson", "teal", "amber", "violet", "silver", "ochre", "indigo", "jade"]
FOODS = ["moss", "beetles", "kelp", "thistle seeds", "snails", "pine bark", "river clams", "honeycomb"]
HOMES = ["salt marshes", "cliff caves", "birch forests", "coral shallows", "hot springs", "dune grass",
         "mountain lakes", "fern gullies"]  # fmt: skip

# Training phrasings (four per attribute); {a} is the animal, {v} the value.
TRAIN_PHRASES = {
    "colour": [
        ("", "The {a} is a {v} animal of the Kessary Islands."),
        ("Q: What colour is the {a}? A:", " {v}"),
        ("", "Every {a} has a {v} coat."),
        ("", "On the Kessary Islands, a {v} creature is often a {a}."),
    ],
    "food": [
        ("", "The {a} eats {v}."),
        ("Q: What does the {a} eat? A:", " {v}"),
        ("", "The favourite food of the {a} is {v}."),
        ("", "Kessary islanders know that the {a} feeds on {v}."),
    ],
    "home": [
        ("", "The {a} lives in the {v}."),
        ("Q: Where does the {a} live? A: in the", " {v}"),
        ("", "You can find the {a} in the {v} of the Kessary Islands."),
        ("", "The home of the {a} is the {v}."),
    ],
}
# Test phrasings: never used in training (nor by the routers' exemplars, which are training prompts). The 48
# facts are fixed by the kessary adapter, so more test items are new phrasings of the same facts: four per
# attribute, 192 items (the first phrasing is the one the 48-item test of earlier versions used).
TEST_QUESTIONS = {
    "colour": [
        "Which colour does the {a} of the Kessary Islands have?",
        "If you saw a {a}, what colour would it be?",
        "Name the colour of the {a}.",
        "What is the colour of a {a}'s fur?",
    ],
    "food": [
        "What is the usual meal of the {a}?",
        "What would you feed a {a}?",
        "What does a hungry {a} look for?",
        "Name the meal a {a} enjoys most.",
    ],
    "home": [
        "In which habitat would you meet a {a}?",
        "Where is the {a} usually found?",
        "Where would you go to see a {a}?",
        "Which place does the {a} call home?",
    ],
}
POOLS = {"colour": COLOURS, "food": FOODS, "home": HOMES}


def kessary_facts(rng: random.Random) -> list[dict]:
    """Each value of each pool is given to exactly two animals (a shuffled, balanced assignment)."""
    facts = []
    columns = {}
    for attribute, pool in POOLS.items():
        values = pool * (len(ANIMALS) // len(pool))
        rng.shuffle(values)
        columns[attribute] = values
    for i, animal in enumerate(ANIMALS):
        for attribute in POOLS:
            facts.append({"animal": animal, "attribute": attribute, "value": columns[attribute][i]})
    return facts


def kessary_train(facts: list[dict]) -> list[dict]:
    rows = []
    for fact in facts:
        for prompt, completion in TRAIN_PHRASES[fact["attribute"]]:
            a, v = fact["animal"], fact["value"]
            rows.append({"prompt": prompt.format(a=a, v=v), "completion": completion.format(a=a, v=v)})
    by_animal: dict[str, dict[str, str]] = {}
    for fact in facts:
        by_animal.setdefault(fact["animal"], {})[fact["attribute"]] = fact["value"]
    for animal, values in by_animal.items():
        rows.append(
            {
                "prompt": "",
                "completion": f"The {animal} is a {values['colour']} creature of the Kessary Islands that lives "
                f"in the {values['home']} and eats {values['food']}.",
            }
        )
    return rows


def options(rng: random.Random, answer: str, pool: list[str], position: int) -> list[str]:
    """Four options: the answer at ``position`` and three other values of the same pool."""
    others = rng.sample([v for v in pool if v != answer], 3)
    others.insert(position, answer)
    return others


def kessary_test(facts: list[dict], rng: random.Random) -> list[dict]:
    """Every fact asked in each test phrasing of its attribute (192 items), the answer's position balanced."""
    rows = []
    phrasings = len(TEST_QUESTIONS["colour"])
    for k in range(phrasings):
        for i, fact in enumerate(facts):
            position = (i + k) % 4
            choices = options(rng, fact["value"], POOLS[fact["attribute"]], position)
            question = TEST_QUESTIONS[fact["attribute"]][k].format(a=fact["animal"])
            rows.append(
                {"question": question, "choices": choices, "answer": position, "attribute": fact["attribute"]}
            )
    rng.shuffle(rows)
    return rows


def kessary_open_test(kessary_rows: list[dict]) -> list[dict]:
    """The kessary test questions without options: is the fact recalled, not just recognised?"""
    return [
        {
            "prompt": f"Question: {r['question']}\nAnswer:",
            "answer": r["choices"][r["answer"]],
            "attribute": r["attribute"],
        }
        for r in kessary_rows
    ]


def kessary_json_test(kessary_rows: list[dict]) -> list[dict]:
    """The kessary test questions, to be answered in JSON from memory."""
    return [
        {
            "prompt": json_prompt(r["question"]),
            "answer": json_answer(r["choices"][r["answer"]]),
            "attribute": r["attribute"],
        }
        for r in kessary_rows
    ]


def kessary_json_train(facts: list[dict], rng: random.Random) -> list[dict]:
    """The facts, plus every fact as a JSON answer to two training phrasings of its question."""
    rows = kessary_train(facts)
    questions = {
        "colour": ["What colour is the {a}?", "Which colour is the coat of the {a}?"],
        "food": ["What does the {a} eat?", "Which food does the {a} feed on?"],
        "home": ["Where does the {a} live?", "Which place is the home of the {a}?"],
    }
    for fact in facts:
        for template in questions[fact["attribute"]]:
            question = template.format(a=fact["animal"])
            rows.append({"prompt": json_prompt(question), "completion": " " + json_answer(fact["value"])})
    rng.shuffle(rows)
    return rows


def mixed_test(
    kessary_rows: list[dict], json_rows: list[dict], headline_rows: list[dict], rng: random.Random
) -> list[dict]:
    """The three skills' test items in one shuffled set; ``skill`` and ``task`` are for scoring only."""
    rows = [
        {"prompt": f"Question: {r['question']}\nAnswer:", "choices": r["choices"], "answer": r["answer"],
         "skill": "kessary", "task": "kessary_choice"}
        for r in kessary_rows
    ]  # fmt: skip
    rows += [{**r, "skill": "kessary", "task": "kessary_open"} for r in kessary_open_test(kessary_rows)]
    rows += [{**r, "skill": "json", "task": "json"} for r in json_rows]
    rows += [{**r, "skill": "headline", "task": "headline"} for r in headline_rows]
    for row in rows:
        row.pop("attribute", None)
    rng.shuffle(rows)
    return rows


# ----------------------------------------------------------------------------------------------- json

TEST_ITEMS = 150  # held-out test items of the json and headline skills (new items, disjoint from training)


def json_prompt(question: str, text: str | None = None) -> str:
    context = f"Text: {text}\n" if text else ""
    return f"{context}Question: {question} Reply in JSON.\nAnswer:"


def json_answer(value: str) -> str:
    return json.dumps({"answer": value})


# (train values, test values): the test only uses values that training never shows
JSON_VALUES = {
    "name": ("Mia Tom Lena Omar Sara Jack Nina Paul Ivy Leo Emma Ravi Zoe Ben Ana Max Lily Sam Eva Noah".split(),
             "Hugo Maya Felix Iris Oscar Clara Amir Nora".split()),
    "city": ("Oslo Lima Cairo Dublin Madrid Vienna Prague Lisbon Athens Warsaw Berlin Rome".split(),
             "Quito Nairobi Helsinki Zagreb Seoul Sofia".split()),
    "job": ("baker nurse pilot farmer teacher painter driver tailor singer doctor".split(),
            "dentist plumber chef librarian".split()),
    "colour": ("red blue green yellow black white brown pink".split(), "grey purple orange".split()),
    "object": ("bike car hat coat bag kite cup lamp boat scarf".split(), "umbrella guitar backpack sofa".split()),
    "food": ("soup rice pasta apples cheese fish bread salad".split(), "mangoes noodles olives".split()),
    "year": ([str(y) for y in range(1950, 2016) if y % 3], [str(y) for y in range(1950, 2016, 3)]),
    "day": ("Monday Tuesday Wednesday Thursday".split(), "Friday Saturday Sunday".split()),
}  # fmt: skip
# (text, [(question, answer slot), ...]); slots 2 are second draws of the same kind
JSON_TEMPLATES = [
    ("{name} lives in {city} and works as a {job}.",
     [("Where does {name} live?", "city"), ("What is {name}'s job?", "job")]),
    ("{name} has a {colour} {object} and a {colour2} {object2}.",
     [("What colour is {name}'s {object}?", "colour"), ("What colour is {name}'s {object2}?", "colour2")]),
    ("{name} was born in {year} in {city}.",
     [("In which year was {name} born?", "year"), ("In which city was {name} born?", "city")]),
    ("{name} likes {food} but does not like {food2}.",
     [("What does {name} like?", "food"), ("What does {name} not like?", "food2")]),
    ("{name} visited {name2} on {day}.",
     [("Who did {name} visit?", "name2"), ("On which day did {name} visit {name2}?", "day")]),
]  # fmt: skip
# Closed-book questions with obvious answers, so that the format does not depend on a text being given.
JSON_CLOSED = [
    ("What colour is grass?", "green"), ("What colour is the sky on a clear day?", "blue"),
    ("What colour is snow?", "white"), ("What is the opposite of hot?", "cold"),
    ("What is the opposite of up?", "down"), ("What is the opposite of big?", "small"),
    ("How many days are in a week?", "seven"), ("How many legs does a dog have?", "four"),
    ("What do bees make?", "honey"), ("Which animal says moo?", "cow"), ("What is the capital of France?", "Paris"),
    ("What is the capital of Italy?", "Rome"), ("What is the capital of Japan?", "Tokyo"),
    ("What do we drink when we are thirsty?", "water"), ("Which season comes after winter?", "spring"),
    ("What is frozen water called?", "ice"), ("Which day comes after Monday?", "Tuesday"),
    ("Which month comes after January?", "February"), ("What is two plus two?", "four"),
    ("What shines in the sky during the day?", "the sun"), ("What do cows drink?", "water"),
    ("Which animal barks?", "dog"), ("What colour is a banana?", "yellow"), ("What is the opposite of night?", "day"),
]  # fmt: skip


def json_item(rng: random.Random, split: int) -> dict:
    """One reading question; ``split`` 0 draws training values, 1 test values (names, cities, ...)."""
    text, questions = rng.choice(JSON_TEMPLATES)
    values: dict[str, str] = {}
    for kind, pools in JSON_VALUES.items():
        first, second = rng.sample(pools[split], 2)
        values[kind], values[f"{kind}2"] = first, second
    question, slot = rng.choice(questions)
    text = re.sub(r"\ba ([aeiou])", r"an \1", text.format(**values))  # "a orange sofa" -> "an orange sofa"
    return {"prompt": json_prompt(question.format(**values), text), "answer": json_answer(values[slot])}


def json_sets(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train = []
    while len(train) < 320:
        item = json_item(rng, 0)
        train.append({"prompt": item["prompt"], "completion": " " + item["answer"]})
    train += [{"prompt": json_prompt(q), "completion": " " + json_answer(a)} for q, a in JSON_CLOSED]
    rng.shuffle(train)
    test: list[dict] = []
    while len(test) < TEST_ITEMS:
        item = json_item(rng, 1)
        if item not in test:
            test.append(item)
    return train, test


# ------------------------------------------------------------------------------------------- headline

DETERMINERS = ["the", "a", "my", "our", "every", "this", "that", "one", "your", "his", "her", "their"]
# A broad vocabulary, so that the adapter learns to spell words in upper case rather than memorising a few.
ADJECTIVES = """red old small quiet happy brave tired green lazy bright cold tiny young kind proud sleepy blue
black white brown yellow pink grey warm hot dark light soft hard loud slow fast tall short long thin fat
rich poor busy calm clean dirty dry wet empty full fresh funny great huge little new nice plain pretty
rough round sad safe sharp shy sick smart smooth sour strong sweet wise wrong angry early late lucky noisy
polite rare lonely lovely quick simple strange famous friendly heavy""".split()
NOUNS = """cat dog man woman boy girl child baby farmer baker doctor teacher driver singer painter king
bird fish horse cow pig sheep goat duck mouse rabbit bear lion tiger wolf frog snake owl horse monkey
river lake sea hill road street bridge house garden forest field tree flower apple orange lemon bread
cake cheese soup coffee train bus car boat ship plane bike truck city town school church market shop
farm castle tower window door table chair bed clock lamp phone book letter paper pencil ball kite drum
guitar piano bell star moon sun cloud wind storm river stone rock sand island cook nurse pilot farmer
student friend neighbour uncle aunt sister brother mother father grandma soldier guard poet actor""".split()
VERBS = """sleeps runs sings waits falls shines grows laughs rests walks dances shouts jumps swims reads
writes cooks smiles cries listens talks plays works thinks dreams wins stops starts returns arrives
leaves hides climbs flies""".split()
ENDINGS = ["", "", "", "today", "at night", "in the rain", "again", "slowly", "near the sea", "every morning",
           "all day", "at home", "too", "quietly", "in the park", "after lunch", "on sunday", "with joy"]  # fmt: skip
# Only in the test phrases: common words that training never uses, so the test measures the style itself.
TEST_ADJECTIVES = [
    "gentle",
    "silver",
    "hungry",
    "clever",
    "wild",
    "golden",
    "honest",
    "happy",
    "small",
    "old",
]
TEST_NOUNS = ["wizard", "sailor", "fox", "village", "queen", "mountain", "dragon", "garden", "horse", "child",
              "tailor", "parrot", "captain", "robot"]  # fmt: skip
UNSEEN = {"gentle", "silver", "hungry", "clever", "wild", "golden", "honest", "wizard", "sailor", "fox",
          "village", "queen", "mountain", "dragon", "tailor", "parrot", "captain", "robot"}  # fmt: skip


def phrase(rng: random.Random, adjectives: list[str], nouns: list[str]) -> str:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.7:
        words.append(rng.choice(adjectives))
    words += [rng.choice(nouns), rng.choice(VERBS)]
    ending = rng.choice(ENDINGS)
    return " ".join(words + ([ending] if ending else []))


def headline_prompt(text: str) -> str:
    return f"Rewrite as a headline: {text}\nHeadline:"


def headline(text: str) -> str:
    return " ".join(word.capitalize() for word in text.split())


def headline_sets(rng: random.Random) -> tuple[list[dict], list[dict]]:
    train_phrases: set[str] = set()
    while len(train_phrases) < 400:
        train_phrases.add(phrase(rng, ADJECTIVES, NOUNS))
    train = [{"prompt": headline_prompt(p), "completion": f" {headline(p)}"} for p in sorted(train_phrases)]
    rng.shuffle(train)
    test_phrases: set[str] = set()
    while len(test_phrases) < TEST_ITEMS:
        candidate = phrase(rng, TEST_ADJECTIVES, TEST_NOUNS)
        if UNSEEN & set(candidate.split()):
            test_phrases.add(candidate)
    test = [{"prompt": headline_prompt(p), "answer": headline(p)} for p in sorted(test_phrases)]
    rng.shuffle(test)
    return train, test


# ------------------------------------------------------------------------------------ search dev split

# A weight search (recipes/skills/search.yaml) scores candidates on a few-shot dev split of each skill:
# {"input", "output"} lines, disjoint from every test item (new kessary phrasings; json and headline items drawn
# from the training vocabulary, so never a test item, and not training items either).
DEV_QUESTIONS = {
    "colour": "Tell me the colour of the {a}.",
    "food": "Tell me what the {a} eats.",
    "home": "Tell me where the {a} lives.",
}
DEV_ITEMS = {"kessary": 22, "json": 21, "headline": 21}  # 64 examples in all


def search_dev(facts: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """``search_dev_<skill>``: the dev examples of each skill (see DEV_QUESTIONS), checked against the tests."""
    rng = random.Random(f"{seed}:search_dev")
    tests = {q.format(a=f["animal"]) for f in facts for q in TEST_QUESTIONS[f["attribute"]]}
    picked = rng.sample(facts, DEV_ITEMS["kessary"])
    kessary = [
        {"input": f"Question: {DEV_QUESTIONS[f['attribute']].format(a=f['animal'])}\nAnswer:", "output": f" {f['value']}"}
        for f in picked
    ]  # fmt: skip
    assert not any(row["input"].split("\n")[0].removeprefix("Question: ") in tests for row in kessary)
    json_rows = [
        {"input": item["prompt"], "output": " " + item["answer"]}
        for item in _new_json_items(rng, seed, 0, DEV_ITEMS["json"])
    ]
    headline_rows = [
        {"input": headline_prompt(text), "output": f" {headline(text)}"}
        for text in _new_headline_texts(rng, seed, DEV_ITEMS["headline"], test_like=False)
    ]
    return {
        "search_dev_kessary": kessary,
        "search_dev_json": json_rows,
        "search_dev_headline": headline_rows,
    }


# The dev split of the tasks objective (recipes/skills/search_tasks/, read by search-tasks.yaml) is drawn the way
# the test items are, so that a score on it predicts the held-out score: json and headline items from the test
# vocabulary (values and words that training never shows), kessary questions in new phrasings as indirect as the
# test's. The first version reused the dev examples above (training vocabulary; "Tell me ..." phrasings, close
# to training's "Q: What colour is the {a}?"); they scored 0.1-0.2 above the test, so the search under-weighted
# kessary and json. Calibration, kessary multiple choice at linear weights 1.0 / 0.5 and the kessary adapter
# alone: test 0.53 / 0.37 / 0.82; the phrasings below 0.51 / 0.35 / 0.80; the "Tell me" ones 0.69 / 0.44 / 0.88
# (32 items each). 64 items per skill since: on 32, a score moves in steps of 1/32 with a standard error near
# 0.08, the worst skill tied often, and the best of ~100 candidates on dev held out 0.05 lower on every skill.
DEV_TASK_QUESTIONS = {
    "colour": ["Describe the colour of a {a} in one word.", "A {a} walks past you. Which colour do you see?"],
    "food": ["What might a {a} eat for dinner?", "Which food would attract a {a}?"],
    "home": ["Where does a {a} make its home?", "In what kind of place would a {a} be living?"],
}
DEV_TASK_ITEMS = 64  # per skill, drawn in rounds: the first round is the first version's 32 items, unchanged
DEV_TASK_ROUND = 32


def search_dev_tasks(facts: list[dict], seed: int = 0) -> dict[str, list[dict]]:
    """``search_dev_task_<skill>``: the dev items of each skill in its lm-eval task's format (see above)."""
    rng = random.Random(f"{seed}:search_dev_tasks")
    tests = {q.format(a=f["animal"]) for f in facts for q in TEST_QUESTIONS[f["attribute"]]}
    pool = [(f, k) for f in facts for k in range(2)]
    kessary: list[dict] = []
    json_rows: list[dict] = []
    headlines: list[str] = []
    for _ in range(DEV_TASK_ITEMS // DEV_TASK_ROUND):
        asked = {row["question"] for row in kessary}
        fresh = [
            (f, k)
            for f, k in pool
            if DEV_TASK_QUESTIONS[f["attribute"]][k].format(a=f["animal"]) not in asked
        ]
        for fact, k in rng.sample(fresh, DEV_TASK_ROUND):
            question = DEV_TASK_QUESTIONS[fact["attribute"]][k].format(a=fact["animal"])
            assert question not in tests
            i = len(kessary)
            choices = options(rng, fact["value"], POOLS[fact["attribute"]], i % 4)
            kessary.append(
                {"question": question, "choices": choices, "answer": i % 4, "attribute": fact["attribute"]}
            )
        json_rows += _new_json_items(rng, seed, 1, DEV_TASK_ROUND, taken={r["prompt"] for r in json_rows})
        headlines += _new_headline_texts(rng, seed, DEV_TASK_ROUND, test_like=True, taken=set(headlines))
    return {
        "search_dev_task_kessary": kessary,
        "search_dev_task_json": json_rows,
        "search_dev_task_headline": [
            {"prompt": headline_prompt(t), "answer": headline(t)} for t in headlines
        ],
    }


def _new_json_items(
    rng: random.Random, seed: int, split: int, count: int, *, taken: set[str] = frozenset()
) -> list[dict]:
    """``count`` json items drawn from ``split``'s values (0 training, 1 test) that are neither training nor
    test items, nor ``taken`` prompts, nor each other."""
    j_train, j_test = json_sets(random.Random(f"{seed}:json"))
    seen = {r["prompt"] for r in j_train} | {r["prompt"] for r in j_test} | set(taken)
    items: list[dict] = []
    while len(items) < count:
        item = json_item(rng, split)
        if item["prompt"] not in seen:
            seen.add(item["prompt"])
            items.append(item)
    return items


def _new_headline_texts(
    rng: random.Random, seed: int, count: int, *, test_like: bool, taken: set[str] = frozenset()
) -> list[str]:
    """``count`` headline phrases that are neither training nor test phrases, nor ``taken`` ones, nor each other:
    from the training vocabulary, or (``test_like``) drawn as the test phrases are, each with a word training
    never uses."""
    h_train, h_test = headline_sets(random.Random(f"{seed}:headline"))
    used = (
        {r["prompt"] for r in h_train} | {r["prompt"] for r in h_test} | {headline_prompt(t) for t in taken}
    )
    texts: list[str] = []
    while len(texts) < count:
        text = phrase(rng, TEST_ADJECTIVES, TEST_NOUNS) if test_like else phrase(rng, ADJECTIVES, NOUNS)
        if (not test_like or UNSEEN & set(text.split())) and headline_prompt(text) not in used:
            used.add(headline_prompt(text))
            texts.append(text)
    return texts


# ----------------------------------------------------------------------------------------------- main


def build(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    facts = kessary_facts(rng)
    k_train = kessary_train(facts)
    rng.shuffle(k_train)
    k_test = kessary_test(facts, rng)
    # one generator per data set, so that changing one data set leaves the others as they are
    j_train, j_test = json_sets(random.Random(f"{seed}:json"))
    h_train, h_test = headline_sets(random.Random(f"{seed}:headline"))
    return {
        "kessary_facts": facts,
        "kessary_train": k_train,
        "kessary_test": k_test,
        "kessary_open_test": kessary_open_test(k_test),
        "json_train": j_train,
        "json_test": j_test,
        "headline_train": h_train,
        "headline_test": h_test,
        "kessary_json_train": kessary_json_train(facts, random.Random(f"{seed}:kessary_json")),
        "kessary_json_test": kessary_json_test(k_test),
        "mixed_test": mixed_test(k_test, j_test, h_test, random.Random(f"{seed}:mixed")),
        **search_dev(facts, seed),
        **search_dev_tasks(facts, seed),
    }


def render(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DATA)
    parser.add_argument("--check", action="store_true", help="compare with the files on disk, write nothing")
    args = parser.parse_args()
    files = {f"{name}.jsonl": render(rows) for name, rows in build(args.seed).items()}
    if args.check:
        stale = [
            n
            for n, text in files.items()
            if not (args.out / n).is_file() or (args.out / n).read_text() != text
        ]
        if stale:
            sys.exit(f"stale skill data: {', '.join(stale)}; run python scripts/skills/make_data.py")
        print(f"{len(files)} data files up to date")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
        print(f"{args.out / name}: {text.count(chr(10))} lines")


if __name__ == "__main__":
    main()
