# Two entry points for a fresh clone: `make demo` and `make test`.
# Both create .venv on first use and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
# torch is pinned to the CPU build this project is developed against; set TORCH to pick
# another build (e.g. TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126').
TORCH  ?= torch==2.13.0
PY      = $(VENV)/bin/python

.PHONY: demo test benchmark quality clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/titans demo

test: $(VENV)/.installed
	$(PY) -m pytest

benchmark: $(VENV)/.installed
	$(PY) benchmarks/throughput.py --rows 1000000 --memory-rows 4000000

quality: $(VENV)/.installed
	$(PY) benchmarks/cascade_quality.py

clean:
	rm -rf $(VENV) titans-demo-output benchmarks/out
