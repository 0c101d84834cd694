"""Switch params.yaml between scales: merge an overlay (scales/<name>.yaml) into it.

The merged file holds every value, so `dvc params diff` and MLflow show exactly what changed;
the merge is validated before anything is written and replaces params.yaml in one rename.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from pipeline import io
from pipeline.config import ConfigError, parse_params, read_yaml

SCALES_DIR = Path("scales")


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / SCALES_DIR).glob("*.yaml"))


def merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, recursively for mappings (lists and values replace)."""
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


def apply(name: str, params_file: Path = Path("params.yaml"), root: Path = Path(".")) -> dict:
    """Merge scales/<name>.yaml into `params_file`; returns the merged settings."""
    overlay_file = root / SCALES_DIR / f"{name}.yaml"
    if not overlay_file.is_file():
        raise ConfigError(f"scale {name!r}: no {overlay_file}; available: {', '.join(available(root)) or 'none'}")
    merged = merge(read_yaml(params_file.read_text()), read_yaml(overlay_file.read_text()))
    parse_params(merged)  # a bad overlay fails here, before params.yaml is touched
    io.write_text(params_file, f"# params.yaml with scales/{name}.yaml merged in (`pipeline scale {name}`)\n"
                  + yaml.safe_dump(merged, sort_keys=False))
    return merged
