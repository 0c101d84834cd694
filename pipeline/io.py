"""Atomic outputs: write beside the target, then rename, so an interrupted stage never
leaves a half-written file or folder that DVC could cache."""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from pipeline import data_parallel
from pipeline.errors import OutputError
from pipeline.layout import timings_of


@contextmanager
def _one_line(target: Path) -> Iterator[None]:
    try:
        yield
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{target}: could not be written ({exc.strerror or exc}); free disk space or "
                          "check the folder's permissions, then rerun") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()  # read once: os.umask can only be read by setting it


def remove_stale(target: Path) -> None:
    """Temporaries a killed earlier write of `target` left beside it (`.NAME.*.tmp`, `.NAME.old`)."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.name.endswith((".tmp", ".old")):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink(missing_ok=True)


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it replaces `target` in one rename,
    with the permissions of a plainly created file (mkstemp's are owner-only). Data-parallel
    ranks other than 0 write to a scratch file that is then dropped: rank 0 alone writes outputs."""
    target = Path(target)
    if not data_parallel.is_main():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch) / target.name
        return
    with _one_line(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp)
        tmp.chmod(0o666 & ~UMASK)
    try:
        with _one_line(target):
            yield tmp
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` whole (on rank 0
    alone, like `atomic_path`)."""
    target = Path(target)
    if not data_parallel.is_main():
        with tempfile.TemporaryDirectory() as scratch:
            yield Path(scratch)
        return
    with _one_line(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        tmp.chmod(0o777 & ~UMASK)  # mkdtemp makes it owner-only; outputs are shared like any other folder
    try:
        with _one_line(target):
            yield tmp
            _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | Path, obj: object) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


# Keys whose values depend on the machine and its load, not on the params: wall and CPU times,
# throughputs, op floors, measured cost ratios, process counts, the platform.
TIMING_KEY = re.compile(r"^(platform|hvp_cost_measured|processes)$|_s$|_ms$|seconds|time|floor")


def split_timings(metrics: dict) -> tuple[dict, dict]:
    """(results, timings) of a nested mapping: a key that names a timing goes, with all below it,
    to the timings; the rest keeps its place."""
    results, timings = {}, {}
    for key, value in metrics.items():
        if TIMING_KEY.search(str(key)):
            timings[key] = value
        elif isinstance(value, dict):
            results[key], below = split_timings(value)
            if below:
                timings[key] = below
        else:
            results[key] = value
    return results, timings


def write_metrics(path: str | Path, metrics: dict) -> None:
    """The results to `path`, their timings to `timings_of(path)`: a rerun with equal results
    leaves `path` byte-identical, whatever the clock said."""
    results, timings = split_timings(metrics)
    write_json(path, results)
    write_json(timings_of(Path(path)), timings)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_torch(path: str | Path, obj: object) -> None:
    """Same tensors, same bytes: torch.save names the archive's root folder after the file it
    writes, which here would be a random temporary name; through a buffer it is always `archive`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
