# Two commands a newcomer needs: `make run` (the main job) and `make test` (everything CI runs).
# Both set up the virtual environment first; it is rebuilt only when pyproject.toml changes.

VENV ?= .venv
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PY := $(VENV)/bin/python
RUN_CONFIG ?=

.PHONY: setup arm64 run test lint benchmark clean

setup: $(VENV)/.installed arm64

# qemu-user 10 (Debian 12's own 7.2 crashes importing ONNX Runtime for aarch64; bookworm-backports has 10.0)
# and the emulated arm64 board's userland (deploy/arm64_userland.py; cached in ~/.cache/edgesplit/arm64,
# made once, about 2 minutes): the ARM numerics test and `edgesplit deploy-local --arm-boards` run on them.
BACKPORTS := deb http://deb.debian.org/debian bookworm-backports main
arm64: $(VENV)/.installed
	@$(PY) -m deploy.arm64_userland --qemu 2>/dev/null || { \
	  grep -qs bookworm /etc/os-release || { $(PY) -m deploy.arm64_userland --check; exit 1; }; \
	  grep -qrs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/ || \
	    echo "$(BACKPORTS)" | $(SUDO) tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-user; }
	$(PY) -m deploy.arm64_userland

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned to the wheels this machine class carries (pip finds them locally).
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	# dev pulls server, which pulls edge and torch: everything (a board installs only ".[edge]").
	$(PY) -m pip install --quiet -e ".[dev]"
	# The dashboard test drives Debian's chromium (Playwright's own browser download is not used);
	# the int8 test runs ONNX Runtime under qemu-user as an AVX2 CPU without VNNI (tests/test_engines.py).
	command -v chromium >/dev/null && command -v qemu-x86_64 >/dev/null || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium qemu-user; }
	touch $@

run: $(VENV)/.installed  # the main job needs no emulated board
	$(PY) -m deploy.simulate --run-config "$(RUN_CONFIG)"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy common client server deploy simulations

test: lint
	# Two workers, one test file each at a time (module fixtures stay in one process), longest files first (tests/conftest.py).
	$(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder --durations=10

benchmark: $(VENV)/.installed
	$(PY) -m simulations.benchmark

clean:
	rm -rf $(VENV) .flwr .pytest_cache .mypy_cache .ruff_cache
