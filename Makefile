# Two commands on a fresh machine: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint typecheck proto bench mutate clean

# torch==2.13.0 first: pip takes the CPU build on disk instead of a CUDA download.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# make test runs the lint steps first: a type error fails fast, before the suite.
test: lint
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/enginetime demo

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) scripts/typecheck.py

# mypy through scripts/typecheck.py: it maps the package-dir folders (sidecar/ ->
# enginetime.sidecar, ...) into build/typecheck/ so imports of enginetime.* resolve to the files.
typecheck: $(STAMP)
	$(PY) scripts/typecheck.py

proto: $(STAMP)
	PYTHON=$(abspath $(PY)) scripts/gen_proto.sh

# Every CPU benchmark in a quick mode (a few minutes on 2 cores); bench/run_all.py --full for default sizes.
bench: $(STAMP)
	$(PY) bench/run_all.py

# Mutation testing of the modules that decide what users see (not part of `make test`; CPU-heavy).
# MUTATE="--module guard_core" narrows it; MUTATE="--sample 150" runs a seeded random sample of each
# module's mutants (the score then comes with its 95 % interval); see scripts/mutate.py.
mutate: $(STAMP)
	nice -n 15 $(PY) scripts/mutate.py $(MUTATE)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
