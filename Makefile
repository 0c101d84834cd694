# Two commands for a newcomer: `make pipeline` (set up + dvc repro) and `make test`.
PYTHON ?= python3

.PHONY: install install-test pipeline test paper-smoke bench

# constraints.txt pins the exact versions behind the committed results; pyproject.toml keeps ranges.
install:
	$(PYTHON) -m pip install -q -c constraints.txt -e .

install-test:
	$(PYTHON) -m pip install -q -c constraints.txt -e ".[test]"

pipeline: install
	$(PYTHON) -m stages.cli run

test: install-test
	$(PYTHON) -m pytest -q --durations=10

# The paper scale (scales/paper.yaml) with only lengths and data sizes shrunk, on fake CIFAR-10 and
# MNIST, every stage through dvc repro: tests/test_paper_smoke.py, docs/scaling.md.
paper-smoke: install-test
	$(PYTHON) -m pytest -q -n 0 -m paper tests/test_paper_smoke.py

bench: install
	$(PYTHON) bench/train_throughput.py
