# The two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install browser bwrap clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Charter needs Python 3.11 or newer")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) browser bwrap

# Debian's Chromium, which the dashboard's browser tests drive (Playwright uses it; it downloads no
# browser). Installed when missing, as root with apt-get; never fatal: without apt or root the
# browser tests skip with the reason (and fail under CI=true).
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; install Chromium yourself to run the dashboard's browser tests"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note: not root; run 'sudo apt-get install -y chromium' to run the dashboard's browser tests"; \
	else \
	  echo "installing Debian's chromium for the dashboard's browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "warning: could not install chromium; the dashboard's browser tests will skip"; \
	fi

# bubblewrap, the jail of `charter run` (Linux; its tests need it). Installed when missing, as root
# with apt-get; never fatal: without apt or root those tests skip with the reason (and fail under
# CI=true). Nothing to do on macOS, where `charter run` applies the limits without a jail.
bwrap:
	@if command -v bwrap >/dev/null 2>&1 || [ "$$(uname -s)" != Linux ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get here; install bubblewrap yourself for the jail of 'charter run' and its tests"; \
	elif [ "$$(id -u)" != 0 ]; then \
	  echo "note: not root; run 'sudo apt-get install -y bubblewrap' for the jail of 'charter run' and its tests"; \
	else \
	  echo "installing bubblewrap for the jail of 'charter run'"; \
	  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
	    || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null)) \
	    || echo "warning: could not install bubblewrap; the jail tests will skip"; \
	fi

demo: $(STAMP)
	$(BIN)/python -m charter.demo

# Half of the suite's time is spent waiting (daemons starting, timers, backoffs), not computing:
# three workers on two cores take it from ~15 to ~8 minutes. Each test file runs whole on one
# worker, so a module's shared daemon starts once. `make test TEST_WORKERS=0` runs it in one process.
TEST_WORKERS ?= 3

test: $(STAMP) browser bwrap
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/bus.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
