"""Test-wide settings."""
import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share two cores: one thread each, and for the stages they start too.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def torch_settings_restored():
    """Stages run in-process switch on deterministic mode (setup_device) and may set threads:
    no test sees what an earlier one left."""
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """TINY's data prepared once: the test files that use it keep TINY's data section. Tests
    read it and never write to it (copy it first)."""
    from helpers import tiny_params
    from pipeline import data

    out = tmp_path_factory.mktemp("prepared")
    data.prepare(tiny_params().data, out)
    return out


def pytest_collection_modifyitems(config, items):
    """Tests marked `paper` (the paper scale shrunk, minutes) run only when -m names them
    (`pytest -m paper`, `make paper-smoke`): `make test` and `-m "not slow"` leave them out.
    Then slow tests first, the end-to-end `dvc repro` one before all: with two workers the longest
    chain starts at once and the short tests fill the other worker around it."""
    if "paper" not in (config.getoption("markexpr") or ""):
        keep = [item for item in items if item.get_closest_marker("paper") is None]
        if len(keep) < len(items):
            config.hook.pytest_deselected(items=[item for item in items if item.get_closest_marker("paper")])
            items[:] = keep
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "test_pipeline_e2e" not in item.nodeid))
