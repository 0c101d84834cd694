"""What one stage reads from another, read in one place: each read checks the shape the reader
needs, and a missing, truncated or malformed file is one line naming the file and the stage that
writes it (stages report an InputError like any fault the user can fix: exit code 2).
"""
from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import ConfigError
from pipeline.layout import SINGLE_INSTANCE, STAGES, timings_of


class InputError(ConfigError):
    """Another stage's output is missing or malformed: one line naming it and its writer."""


def writer_of(path: Path) -> str:
    """The stage whose output `path` is, by the one rule of pipeline/layout.py
    (<kind>/<stage>/<instance>...), or 'its stage'."""
    found = re.search(r"(?:^|/)(?:metrics|timings|plots|results|figures|models)/(?P<stage>[\w-]+)(?P<rest>(?:\.\w+)?(?:/.*)?)$",
                      path.as_posix())
    if not found or found["stage"] not in STAGES:
        return "its stage"
    if found["stage"] in SINGLE_INSTANCE:
        return found["stage"]
    instance = re.match(r"/([^/]+?)(?:\.(?:json|pt|csv))?(?:/|$)", found["rest"])
    return f"{found['stage']}@{instance[1]}" if instance else "its stage"


def _fail(path: Path, problem: str) -> InputError:
    stage = writer_of(path)
    how = f"run `dvc repro {stage}`" if stage != "its stage" else "rerun the stage that writes it"
    return InputError(f"{path}: {problem}; it is written by {stage}: {how}")


def read_json(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A JSON mapping holding at least `keys`."""
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise _fail(path, "missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise _fail(path, "not valid JSON (truncated or edited?)") from None
    return _mapping(path, value, keys)


def read_metrics(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A results file (`io.write_metrics`) with its timings merged back in, where they were."""
    results, timings = read_json(path, keys), timings_of(Path(path))
    return _merged(results, read_json(timings)) if timings.is_file() else results


def _merged(results: dict, timings: dict) -> dict:
    out = dict(results)
    for key, value in timings.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_torch(path: Path, keys: tuple[str, ...] = ()) -> dict:
    """A torch.save'd mapping of tensors (weights only) holding at least `keys`."""
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise _fail(path, "missing") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError):
        raise _fail(path, "not a readable torch file (truncated or edited?)") from None
    return _mapping(path, value, keys)


def _mapping(path: Path, value: object, keys: tuple[str, ...]) -> dict:
    if not isinstance(value, dict):
        raise _fail(path, f"holds a {type(value).__name__}, not a mapping")
    if missing := [k for k in keys if k not in value]:
        raise _fail(path, f"lacks {', '.join(missing)}")
    return value


def read_csv(path: Path, columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """A CSV table with at least `columns`."""
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise _fail(path, "missing") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        raise _fail(path, "not a readable CSV table") from None
    if missing := [c for c in columns if c not in frame.columns]:
        raise _fail(path, f"lacks column(s) {', '.join(missing)}")
    return frame
