# Two commands for a newcomer: `make pipeline` (set up + dvc repro) and `make test`.
PYTHON ?= python3

.PHONY: install install-test pipeline test bench

# constraints.txt pins the exact versions behind the committed results; pyproject.toml keeps ranges.
install:
	$(PYTHON) -m pip install -q -c constraints.txt -e .

install-test:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test]"

pipeline: install
	$(PYTHON) -m stages.cli run

test: install-test
	$(PYTHON) -m pytest -q --durations=10

bench: install
	$(PYTHON) bench/train_throughput.py
