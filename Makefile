# `make demo` and `make test` work on a fresh clone: the first call creates
# .venv and installs requirements.txt into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench notebooks clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python ch05_detection/train_faster_rcnn.py

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Execute every notebook top to bottom in FAST mode (offline, in its own folder) and save it with its
# outputs and a hash of its code (checked by tests/test_notebooks.py). NOTEBOOKS="a.ipynb b.ipynb" picks some.
notebooks: $(STAMP)
	$(BIN)/python tools/run_notebooks.py $(NOTEBOOKS)

bench: $(STAMP)
	for f in bench/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf runs .pytest_cache
