# One place for the project's chores. Every target sets up what it needs: venv, pinned installs, stubs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STUBS := modelserver_pb2.py modelserver_pb2_grpc.py inference_pb2.py inference_pb2_grpc.py
DEMO_PORT ?= 5440
# Set to https://download.pytorch.org/whl/cpu to fetch the small CPU-only torch from PyTorch's index.
TORCH_INDEX_URL ?=
REPLICAS ?= 2
RAY_GRPC_PORT ?= 9000

.PHONY: setup setup-ray stubs serve serve-ray stop-ray demo test lint bench autograde clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) -r requirements-dev.txt
	touch $@

setup: $(VENV)/.installed

# Ray Serve, for the fleet and its tests: about 1 GB more in the venv.
$(VENV)/.ray-installed: requirements-ray.txt $(VENV)/.installed
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL)) -r requirements-ray.txt
	touch $@

setup-ray: $(VENV)/.ray-installed

$(STUBS) &: modelserver.proto inference.proto $(VENV)/.installed
	$(PY) -m grpc_tools.protoc -I=. --python_out=. --grpc_python_out=. modelserver.proto inference.proto

stubs: $(STUBS)

serve: stubs
	$(PY) server.py $(ARGS)

# A local Ray with REPLICAS servers behind Ray Serve's gRPC proxy on RAY_GRPC_PORT; returns once all are ready.
# MODEL=path serves a model file instead of SetCoefs' linear model.
serve-ray: setup-ray stubs
	$(PY) deploy/ray/fleet.py up --replicas $(REPLICAS) --grpc-port $(RAY_GRPC_PORT) $(if $(MODEL),--model $(MODEL))

stop-ray: setup-ray
	$(PY) deploy/ray/fleet.py down

# Serve on loopback, run the client on the bundled workloads, stop the server.
demo: stubs
	@$(PY) server.py --host 127.0.0.1 --port $(DEMO_PORT) & server=$$!; \
	trap 'kill $$server; wait $$server' EXIT; \
	$(PY) client.py $(DEMO_PORT) 1,2,3 workloads/*.csv

# Ray Serve is installed if it can be; where it cannot, its tests say so and skip (under CI they fail).
test: stubs
	-@$(MAKE) --no-print-directory setup-ray
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
