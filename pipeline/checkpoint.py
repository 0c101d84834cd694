"""Resumable stages: a checkpoint is reused only by the code, settings, data and device that
wrote it. Anything else (other code, a corrupt or foreign file) is said in one line on stderr
and the stage starts over; nothing in a checkpoint is executed (tensors and plain data only)."""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from pathlib import Path

import torch

from pipeline import data_parallel
from pipeline.io import save_torch

SOURCE = Path(__file__).resolve().parents[1]  # the folder holding pipeline/ and stages/


def fingerprint(*parts: object) -> str:
    """Digest of the settings a checkpoint depends on (JSON-serialisable parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_digest(root: Path = SOURCE) -> str:
    """sha256 over the project's Python source (pipeline/ and stages/): what the stages run."""
    digest = hashlib.sha256()
    for path in sorted([*root.glob("pipeline/**/*.py"), *root.glob("stages/**/*.py")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def device_tag(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Checkpoint:
    """`key`: the settings' fingerprint. The device is the one `load` is asked to load onto
    (stages always try to resume before they save)."""

    def __init__(self, path: str | Path, key: str):
        self.path, self.settings, self.device = Path(path), key, "cpu"

    @property
    def key(self) -> str:
        # Ranks see other BatchNorm batches: a state trained on W ranks only resumes on W ranks.
        return fingerprint(self.settings, code_digest(), self.device, data_parallel.world_size())

    def load(self, map_location: torch.device | str = "cpu") -> dict | None:
        """The saved state, or None when there is none, or it cannot be read, or other code,
        settings, data or device wrote it."""
        self.device = device_tag(map_location)
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location=map_location, weights_only=True)
            key, state = saved["key"], saved["state"]
        except Exception as exc:  # truncated, random bytes, empty, not ours: all mean "unusable"
            _warn(f"{self.path}: unreadable checkpoint ({type(exc).__name__}); starting over")
            return None
        if key != self.key:
            _warn(f"{self.path}: written by other code, settings, data or device; starting over")
            return None
        return state

    def save(self, state: dict) -> None:
        save_torch(self.path, {"key": self.key, "state": state})

    def clear(self) -> None:
        if data_parallel.is_main():
            self.path.unlink(missing_ok=True)
