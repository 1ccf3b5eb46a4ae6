# The two commands the README names. Everything else is a helper.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
MINUTES ?= 2

.PHONY: test test-fast demo venv bench torture docs clean

$(BIN)/walctl: pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,docs]'
	@touch $@

venv: $(BIN)/walctl

test: venv
	$(BIN)/python -m pytest -q

# The inner loop: all but tests/e2e/ (real processes and clients) and the heavy-marked tests.
test-fast: venv
	$(BIN)/python -m pytest -q --ignore=tests/e2e -m "not heavy" --hypothesis-profile=dev

demo: venv
	$(BIN)/python -m tools.demo

bench: venv
	$(BIN)/walctl bench wal

torture: venv
	$(BIN)/walctl torture --minutes $(MINUTES)

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on a broken link or anchor.
docs: venv
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis demo-nodes site
