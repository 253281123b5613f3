# Two commands: `make demo` and `make test`. Both create or update .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint bench doctor-eval clean

$(STAMP): requirements-dev.txt requirements-fastai.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -r requirements-fastai.txt  # fastai without torchvision (a CUDA build)
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stepaudit demo

test: $(STAMP) lint
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests tools bench
	$(VENV)/bin/ruff format --check src tests tools bench

# Benchmarks run with the anchors venv (Cockpit, BackPACK, PyHessian side by side) when it exists:
# bash bench/anchors.sh builds it. Without it the anchors' cells say "not installed".
BENCH_PY = $$([ -x bench/.venv-anchors/bin/python ] && echo bench/.venv-anchors/bin/python || echo $(PY))

bench: $(STAMP)
	$(BENCH_PY) bench/overhead.py

doctor-eval: $(STAMP)
	$(PY) tools/doctor_eval.py tests/doctor/cases

clean:
	rm -rf $(VENV) stepaudit-runs build *.egg-info
