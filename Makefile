# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# glibc's malloc returns big blocks to the OS after every batch; these keep them (see docs/performance.md).
export MALLOC_MMAP_THRESHOLD_ ?= 1073741824
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824
export MALLOC_TOP_PAD_ ?= 268435456

.PHONY: install run test lint bench tools clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[service,worker,dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/inspector run

# docker-compose (v1, Debian package) validates docker-compose.yml without a daemon;
# chromium (Debian package) is the browser the web page's tests (tests/ui) drive with Playwright.
APT_TOOLS := docker-compose chromium  # command = Debian package name
tools:
	@missing=""; for t in $(APT_TOOLS); do command -v $$t >/dev/null 2>&1 || missing="$$missing $$t"; done; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing) >/dev/null 2>&1; } || \
	  echo "could not install$$missing (needs root and apt): the compose check / browser tests will be skipped"

test: $(STAMP) tools
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check schemas service workers model_inspector tests benchmarks
	$(VENV)/bin/mypy schemas service workers model_inspector

bench: $(STAMP)
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/attributions.py --quick

clean:
	rm -rf $(VENV) var .pytest_cache
