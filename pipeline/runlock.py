"""One process per stage instance. A `dvc repro` killed while its stage runs leaves the stage
running; a second `dvc repro` would start a duplicate writing the same outputs. Each stage
execution holds an advisory lock of its own; a second one is refused in one line naming the
process that holds it. The operating system drops the lock when the holder dies, however it dies."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: no advisory locks
    fcntl = None

LOCK_DIR = Path("checkpoints")  # beside the checkpoints: per workspace, never a DVC output


class StageBusy(RuntimeError):
    """Another process runs this stage instance now; the message is one line naming it."""


@contextmanager
def exclusive(name: str, folder: Path = LOCK_DIR) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.lock"
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StageBusy(f"stage {name} is already running (process {holder}, lock {path}); wait for it "
                            "to end or stop that process") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
