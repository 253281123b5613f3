# Two commands: `make demo` and `make test`. Both create or update .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench doctor-eval clean

$(STAMP): requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/stepaudit demo

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/overhead.py

doctor-eval: $(STAMP)
	$(PY) -m stepaudit.doctor.evaluate tests/doctor_cases

clean:
	rm -rf $(VENV) stepaudit-runs build *.egg-info
