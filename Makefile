# vslice: two entry points on a fresh machine -- `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= ../shared
TRACES := $(SHARED)/traces/openb
NATIVE_DIRS := $(wildcard services/nodeagent/mockgpu services/nodeagent/libvgpu)

.PHONY: install native chromium kubectl compose-tool lint test demo clean

install: $(VENV)/.installed

# uv resolves and installs the same pins as pip in a fraction of the time (about 10 s
# against 50 s on a 2-core machine); pip takes over where uv cannot be installed or fails.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	{ $(BIN)/python -m pip install --quiet uv && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[test]'; } || \
	{ $(BIN)/python -m pip install --quiet --upgrade pip && \
	  $(BIN)/python -m pip install --quiet -e '.[test]'; }
	touch $@

native:
	@for d in $(NATIVE_DIRS); do $(MAKE) --no-print-directory -C $$d || exit 1; done

# Debian's chromium for the dashboard's browser test (driven by playwright, no browser
# download); installed once, skipped when present.
chromium:
	@test -x /usr/bin/chromium || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

# Debian's kubectl (kustomize built in) for `kubectl kustomize k8s/` and Debian's
# docker-compose for validating compose/ (no Docker engine needed); skipped when present.
kubectl:
	@command -v kubectl >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends kubernetes-client; }

compose-tool:
	@command -v docker-compose >/dev/null || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends docker-compose; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: install native chromium kubectl compose-tool lint
	VSLICE_TRACES=$(TRACES) $(BIN)/python -m pytest

# The openb trace replayed over the bus (nats-server, admission, two scheduler replicas,
# a mock node agent hosting the fleet) with FGD, beside the same replay in process.
demo: install native
	$(BIN)/vslice replay $(TRACES)/openb_pod_list_default.csv \
		--fleet $(TRACES)/openb_node_list_gpu_node.csv \
		--policy fgd --seeds 42 --replicas 2 --concurrency 16 \
		--compare-in-process --json demo-replay.json

clean:
	rm -rf $(VENV) build *.egg-info
	@for d in $(NATIVE_DIRS); do $(MAKE) --no-print-directory -C $$d clean; done

# The kubelet device-plugin API's Python modules and their type stubs, regenerated from its
# .proto (grpcio-tools; mypy-protobuf's protoc plugins for the .pyi files).
KUBELETAPI := services/nodeagent/adapters/kubeletapi
.PHONY: protos
protos: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -I . \
		--python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. $(KUBELETAPI)/api.proto
