# `make train` and `make test` create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install train test test-slow test-all bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## the virtual environment with the zoo and its test tools (VENV=<folder> puts it elsewhere)

train: $(STAMP)  ## train the default experiment (a CNN on scikit-learn's digits)
	$(PY) train.py $(ARGS)

# The default suite runs its test files on one pytest-xdist worker per core (at most 4), one torch thread each
# (OMP_NUM_THREADS, unless set); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 4 ] && n=4; echo $$n)

# pytest exits 5 when it collected no test (3 under pytest-xdist, whose workers then stop on an internal error):
# for the default suite that is a failure, not a pass
test: $(STAMP)  ## the fast test suite (CI runs this)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow" -n $(TEST_WORKERS) --dist loadfile $(ARGS); \
	rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; \
	if [ $$rc -eq 3 ]; then echo "error: pytest stopped on an internal error (under xdist: no test selected?)"; fi; \
	exit $$rc

test-slow: $(STAMP)  ## tests that train to the quality bounds of the experiment configs
	$(PY) -m pytest -m slow $(ARGS); rc=$$?; [ $$rc -eq 5 ] && exit 0; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest $(ARGS)

bench: $(STAMP)  ## speed and quality tables
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/quality.py

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
