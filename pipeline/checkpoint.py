"""Resumable stages: a checkpoint is valid only for the settings that wrote it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.io import save_torch


def fingerprint(*parts: object) -> str:
    """Digest of the settings a checkpoint depends on (JSON-serialisable parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class Checkpoint:
    def __init__(self, path: str | Path, key: str):
        self.path, self.key = Path(path), key

    def load(self, map_location: torch.device | str = "cpu") -> dict | None:
        """The saved state, or None when there is none or it belongs to other settings."""
        if not self.path.exists():
            return None
        saved = torch.load(self.path, map_location=map_location, weights_only=False)
        return saved["state"] if saved.get("key") == self.key else None

    def save(self, state: dict) -> None:
        save_torch(self.path, {"key": self.key, "state": state})

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
