# The two commands: `make up` (a local stack) and `make test`. Each installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME_STAMP := $(VENV)/.runtime-installed
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: help up test check lint unit bench chaos redis-server iproute prometheus claude-cli docker-compose podman images stack stack-down restart-workers clean

# `make help` lists every target: each is the word before ':' on a line whose comment starts '## '.
help: ## list every target and what it does
	@awk -F':.*## ' '/^[a-zA-Z_-]+:.*## / {printf "  make %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# `make up` needs only what running needs; the dev tools (pytest, ruff, mypy, ...) come with the
# targets that test or lint.
$(RUNTIME_STAMP): setup.cfg pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	@touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

# Tests start their own redis-server on a free port; they only need the binary.
redis-server: ## install redis-server if missing (the tests start their own on free ports)
	@command -v redis-server >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "redis-server not found: installing Debian's redis-server package"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; \
	  else \
	    echo "redis-server not found and apt-get is unavailable: install Redis (>= 6) and put redis-server on PATH" >&2; exit 1; \
	  fi; }

# iproute2's `ip` for the host tests (tests/hosts/: hosts are network namespaces joined by veth
# pairs). They also need root; without either they skip and say why.
iproute: ## install iproute2 if missing (the host tests' network namespaces)
	@command -v ip >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "ip not found: installing Debian's iproute2 package"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends iproute2 >/dev/null; \
	  else \
	    echo "ip not found and apt-get is unavailable: the host tests will be skipped" >&2; \
	  fi; }

# prometheus and promtool for the monitoring tests (promtool check/test; a real Prometheus on a
# free port). --no-install-recommends keeps prometheus-node-exporter (port 9100) out.
prometheus: ## install prometheus and promtool if missing (monitoring tests)
	@command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "prometheus not found: installing Debian's prometheus package"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	  else \
	    echo "prometheus not found and apt-get is unavailable: the monitoring tests will be skipped" >&2; \
	  fi; }

# The real Claude Code CLI (pinned, from npm) for the end-to-end check against a loopback fake
# API. Without npm the e2e tests skip and say why; nothing else depends on it.
claude-cli: ## install the pinned Claude Code CLI for the e2e tests
	@tests/e2e/install_claude.sh >/dev/null || echo "claude CLI not installed: the e2e tests will be skipped" >&2

# Debian's docker-compose (v1) checks docker-compose.yml in the tests; no Docker engine is needed
# (--no-install-recommends keeps docker.io out).
docker-compose: ## install docker-compose v1 if missing (checks docker-compose.yml)
	@command -v docker-compose >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "docker-compose not found: installing Debian's docker-compose package"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; \
	  else \
	    echo "docker-compose not found and apt-get is unavailable: the compose test will be skipped" >&2; \
	  fi; }

# Debian's podman and what the container tests need with it (tests/containers/: the images built
# from a debootstrap base, the compose stack run through podman's Docker API). netavark needs
# iptables. Without apt-get, or where podman cannot run, those tests skip and say why.
PODMAN_PACKAGES := podman buildah netavark aardvark-dns uidmap runc debootstrap iptables
podman: ## install podman and friends if missing (the container tests)
	@command -v podman >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1 && command -v iptables >/dev/null 2>&1 || { \
	  if command -v apt-get >/dev/null 2>&1; then \
	    echo "podman not found: installing Debian's $(PODMAN_PACKAGES)"; \
	    $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(PODMAN_PACKAGES) >/dev/null; \
	  else \
	    echo "podman not found and apt-get is unavailable: the container tests will be skipped" >&2; \
	  fi; }

# The images for a user, with Docker or podman (whichever is here): BASE_IMAGE=..., IMAGE_TAG=...
images: ## build the worker and orchestrator images (docker or podman)
	scripts/containers images

# The compose stack (docker-compose.yml), built and up: ENV_FILE=.env.production make stack.
# The secrets come from the shell (README, "Running the stack"). `make stack-down` stops it.
stack: ## bring the compose stack up (docker or podman)
	scripts/containers stack

stack-down: ## take the compose stack down
	scripts/containers down

# Restart every worker's programs gracefully, one worker at a time: the local stack of `make up`
# when it runs, else the compose stack (COMPOSE="docker compose --env-file .env.production").
restart-workers: $(RUNTIME_STAMP) ## restart every worker gracefully, one at a time (WORKERS=...)
	$(BIN)/python scripts/restart-workers $(WORKERS)

up: $(RUNTIME_STAMP) ## run a local stack in the foreground (workers marie, anga, fabien + orchestrator)
	$(BIN)/activation up

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check activation tests benchmarks scripts/restart-workers
	$(BIN)/mypy activation

# The whole suite in 4 pytest-xdist workers (about 9 minutes instead of 24 serially; the 15
# slowest tests are listed at the end, for whoever makes it faster;
# TEST_WORKERS=0 runs it in one process): tests/xdist_groups.py puts the tests that share
# something of the machine (podman, network namespaces, the chaos runs) in groups, a group in one
# worker a test at a time, and tests/harness.free_port gives each worker its own ports.
TEST_WORKERS ?= 4
test: $(STAMP) redis-server iproute prometheus claude-cli docker-compose podman lint ## install the test tools, lint, run the whole suite (TEST_WORKERS=4: in parallel)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup --durations=15

unit: $(STAMP) ## the unit tests only
	$(BIN)/pytest tests/unit

# The development loop: lint, types and the fast tests (no process trees), in under 2 minutes.
check: lint ## lint and the fast tests (not slow), the development loop
	$(BIN)/pytest -m 'not slow' -p no:cacheprovider -n 4

# Every figure of issue 15 beside its target, in one run (about 10 minutes; BENCH="--quick" for a
# short one, BENCH="--help" for the flags). The peers it measures against (RQ) are the bench extra.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP) setup.cfg
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP) redis-server ## every figure of issue 15 beside its target (BENCH=--quick)
	$(BIN)/python -m benchmarks $(BENCH)

# The chaos runs alone, bigger if you like: make chaos N=10000 (files mode; STREAMS_N for streams mode)
N ?= 3000
STREAMS_N ?= $(N)
chaos: $(STAMP) redis-server ## the chaos runs alone, files and streams mode (N=3000 tasks each by default)
	ACTIVATION_CHAOS_TASKS=$(N) ACTIVATION_CHAOS_STREAMS_TASKS=$(STREAMS_N) $(BIN)/pytest -s -p no:cacheprovider tests/chaos/test_chaos.py

clean: ## remove .venv, var/ and caches
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache *.egg-info
