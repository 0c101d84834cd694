"""Every random stream is a pure function of (seed, stream, index): batch order, dropout masks and
initial weights can be recomputed for any step (the reverse passes rely on it), and two runs with
one seed draw the same numbers whatever ran before them."""
from __future__ import annotations

import numpy as np
import torch

BATCH_STREAM, MASK_STREAM, INIT_STREAM = 1, 2, 3


def derive_seed(seed: int, stream: int, index: int = 0) -> int:
    """A well-mixed 63-bit seed for (seed, stream, index): neighbouring steps get unrelated streams."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def generator(seed: int, stream: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, stream, index))
