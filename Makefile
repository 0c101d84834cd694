# Two commands for a newcomer: `make pipeline` (set up + dvc repro) and `make test`.
PYTHON ?= python3

.PHONY: install install-test pipeline test bench

install:
	$(PYTHON) -m pip install -q -e .

install-test:
	$(PYTHON) -m pip install -q -e ".[test]"

pipeline: install
	$(PYTHON) -m stages.cli run

test: install-test
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/train_throughput.py
