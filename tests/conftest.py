"""Test-wide settings."""
import os

import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share two cores: one thread each, and for the stages they start too.
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
