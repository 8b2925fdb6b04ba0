# torchship: the two commands a new user needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.torchship-installed
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= digits
STORE ?= models
PYTEST_ARGS ?=

.PHONY: install serve test lint typecheck pytest system-deps train-demo lessons bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip 2>/dev/null || true
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

train-demo: install
	$(VENV)/bin/torchship train-demo --store $(STORE) --name $(MODEL) --if-missing

serve: train-demo
	$(VENV)/bin/torchship serve --store $(STORE) --model $(MODEL) --host $(HOST) --port $(PORT)

system-deps:
	@bash scripts/system-deps.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

pytest: install
	$(PY) -m pytest $(PYTEST_ARGS)

test: install system-deps lint typecheck pytest

# Every lesson that runs to completion (04 and 05 serve until Ctrl-C: run them by hand).
lessons: install
	@for f in $$(ls [0-9][0-9]_*.py | grep -v -e '^04_' -e '^05_'); do \
		echo "== $$f"; $(PY) $$f || exit 1; done

bench: install
	$(PY) benchmarks/runtimes.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
