# Fresh machine: `make demo` (set up, export the tiny model, serve it on a real tritonserver,
# write one generated image) and `make test` (set up, run the test suite).
# Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
REPO ?= model_repository
COMPONENTS ?= 2
PROMPT ?= a handwritten digit 7
OUT ?= digit.png
PYTEST_ARGS ?=
# COMPONENTS set on the command line or in the environment must match an existing $(REPO),
# which is served as it is, never re-exported: serve and demo refuse another N.
CHECK_N := $(if $(filter command line environment,$(origin COMPONENTS)),--components $(COMPONENTS))

.PHONY: install repository serve demo test gpu-check helm-check

install: $(STAMP)

# One pip run resolves every pin together (see pyproject.toml for why).
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# The embedded tiny model, N=$(COMPONENTS) components on the CPU (onnxruntime), if not exported yet.
$(REPO)/asyncdiff/config.pbtxt: | $(STAMP)
	$(PY) -m export --model tiny --components $(COMPONENTS) --backend onnxruntime --out $(REPO)

repository: $(REPO)/asyncdiff/config.pbtxt

serve: repository
	$(PY) -m serve --model-repository $(REPO) $(CHECK_N)

demo: repository
	$(PY) -m serve.demo --model-repository $(REPO) --prompt "$(PROMPT)" --out $(OUT) $(CHECK_N)

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q --durations=25 $(PYTEST_ARGS)

# The Helm chart (deploy/helm/asyncdiff) rendered by Helm's engine for N=1..4, S=1..2 and every
# manifest checked against the Kubernetes schemas (no cluster needed).
helm-check: | $(STAMP)
	$(PY) -m deploy.render

# One NVIDIA GPU with torch+CUDA, nothing downloaded: carried wheels (.whl/), then the GPU
# benchmark (<= 5 min), with the host's python3 (PYTHON=... to choose another).
# GPU_CHECK_ARGS="--device cpu --quick" is the CPU smoke run, with this project's venv.
GPU_CHECK_CPU := $(findstring --device cpu,$(GPU_CHECK_ARGS))
gpu-check: $(if $(GPU_CHECK_CPU),| $(STAMP))
	PYTHON="$${PYTHON:-$(if $(GPU_CHECK_CPU),$(PY),python3)}" bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# Here, for gpu-check on a host without the nvidia-pytriton wheel: the trimmed server archive
# for that host's Python (GPU_PYTHON; with a stripped libpython from a shared pythonX.Y on
# PATH, dropped by LIBPYTHON=) and the tiny cpu/gpu repositories, into .triton/ (carry it).
.PHONY: gpu-check-prepare
GPU_PYTHON ?= 3.12
LIBPYTHON ?= --with-libpython
gpu-check-prepare: | $(STAMP)
	$(PY) -m benchmarks.triton_archive --python $(GPU_PYTHON) $(LIBPYTHON) \
	  --out .triton/tritonserver-py$(subst .,,$(GPU_PYTHON)).tar.xz
	$(PY) -m benchmarks.gpu_serve prepare
