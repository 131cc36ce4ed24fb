# One place for the project's chores. Every target sets up what it needs: venv, pinned installs, stubs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STUBS := modelserver_pb2.py modelserver_pb2_grpc.py inference_pb2.py inference_pb2_grpc.py
DEMO_PORT ?= 5440
# Set to https://download.pytorch.org/whl/cpu to fetch the small CPU-only torch from PyTorch's index.
TORCH_INDEX_URL ?=

.PHONY: setup stubs serve demo test lint bench autograde clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

$(STUBS) &: modelserver.proto inference.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto inference.proto

stubs: $(STUBS)

serve: stubs
	$(PY) server.py $(ARGS)

# Serve on loopback, run the client on the bundled workloads, stop the server.
demo: stubs
	@$(PY) server.py --host 127.0.0.1 --port $(DEMO_PORT) & server=$$!; \
	trap 'kill $$server; wait $$server' EXIT; \
	$(PY) client.py $(DEMO_PORT) 1,2,3 workloads/*.csv

test: stubs
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff's lint rules and formatting, and mypy; settings in pyproject.toml.
lint: stubs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: stubs
	$(PY) bench.py $(ARGS)

autograde: stubs
	$(PY) autograde.py $(ARGS)

clean:
	rm -rf $(VENV) $(STUBS) .pytest_cache .hypothesis .mypy_cache .ruff_cache __pycache__ */__pycache__
