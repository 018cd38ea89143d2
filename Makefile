# Quick start: `make demo` and `make test` on a fresh clone with Python 3.11 and pip.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo lm test bench clean

$(VENV)/.installed: requirements-dev.txt setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/digits.py

lm: $(VENV)/.installed
	$(PY) examples/lm.py --minutes 3 --out runs/lm

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 tests

bench: $(VENV)/.installed
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/data.py
	$(PY) benchmarks/optim.py
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/sharding.py

clean:
	rm -rf $(VENV) runs .pytest_cache
