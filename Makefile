# One entry point for set-up, the demo and the checks. CPU torch 2.13.0 is installed first (a local wheel);
# any later `torch>=` requirement is then already satisfied and pulls nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: setup demo quality test lint format schema clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The main job: merge three skill LoRAs (recipes/skills/) into one with linear, ties, dare_ties and svd, extract
# a LoRA from a full fine-tune, and score every result against the base and the skill adapters with lm-eval.
demo: setup
	$(BIN)/python scripts/skills/study.py --demo

# The full quality study: regenerates docs/quality.md, docs/quality.png and recipes/skills/study_results.json.
quality: setup
	$(BIN)/python scripts/skills/study.py

test: setup lint
	$(BIN)/loracook schema --check
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check loracook tests benchmarks scripts
	$(BIN)/ruff format --check loracook tests benchmarks scripts

format: setup
	$(BIN)/ruff check --fix loracook tests benchmarks scripts
	$(BIN)/ruff format loracook tests benchmarks scripts

schema: setup
	$(BIN)/loracook schema

clean:
	rm -rf out .pytest_cache .ruff_cache
