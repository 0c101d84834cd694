"""Switch params.yaml between scales: merge an overlay (scales/<name>.yaml) into it.

The merged file holds every value, so `dvc params diff` and MLflow show exactly what changed;
the merge is validated before anything is written and replaces params.yaml in one rename.
params.yaml is edited as a round trip (ruamel.yaml): its comments, order and layout stay.
"""
from __future__ import annotations

import io as text_io
from pathlib import Path

from ruamel.yaml import YAML

from pipeline import io
from pipeline.config import ConfigError, Params, parse_params, read_yaml

SCALES_DIR = Path("scales")


def available(root: Path = Path(".")) -> list[str]:
    return sorted(p.stem for p in (root / SCALES_DIR).glob("*.yaml"))


def merge(base: dict, overlay: dict) -> dict:
    """`overlay` over `base`, recursively for mappings (lists and values replace), in place so
    that a round-trip mapping keeps its comments."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def apply(name: str, params_file: Path = Path("params.yaml"), root: Path = Path(".")) -> dict:
    """Merge scales/<name>.yaml into `params_file`; returns the merged settings."""
    overlay_file = root / SCALES_DIR / f"{name}.yaml"
    if not overlay_file.is_file():
        raise ConfigError(f"scale {name!r}: no {overlay_file}; available: {', '.join(available(root)) or 'none'}")
    round_trip = YAML()  # YAML 1.2, like read_yaml: 1e-4 is a number
    round_trip.width = 120
    merged = merge(round_trip.load(params_file.read_text()), read_yaml(overlay_file.read_text(), str(overlay_file)))
    out = text_io.StringIO()
    round_trip.dump(merged, out)
    text = f"# params.yaml with scales/{name}.yaml merged in (`pipeline scale {name}`)\n" + out.getvalue()
    settings = read_yaml(text)
    parse_params(settings)  # a bad overlay fails here, before params.yaml is touched
    io.write_text(params_file, text)
    return settings


def preview(name: str, params_file: Path = Path("params.yaml"), root: Path = Path(".")) -> Params:
    """The settings `apply` would write, validated, with `params_file` left as it is."""
    overlay_file = root / SCALES_DIR / f"{name}.yaml"
    if not overlay_file.is_file():
        raise ConfigError(f"scale {name!r}: no {overlay_file}; available: {', '.join(available(root)) or 'none'}")
    merged = merge(read_yaml(params_file.read_text(), str(params_file)) or {},
                   read_yaml(overlay_file.read_text(), str(overlay_file)))
    return parse_params(merged, complete=True)


TORCHVISION = ("cifar10", "mnist")  # sources torchvision reads from data/raw (or downloads)


def needs(params: Params, has_gpu: bool) -> list[str]:
    """What these settings need beyond the package, one line each: the downloads of torchvision's
    datasets and, for a DenseNet-40 or larger, a GPU when this machine has none."""
    out = []
    for where, data in (("data", params.data), ("quality.data", params.quality.data)):
        if data.source in TORCHVISION:
            how = "downloads it once" if data.download else "reads it (data.download: false)"
            out.append(f"{where}.source: {data.source}: torchvision {how} into {data.root}; offline, put it there yourself")
    if params.model.depth >= 40 and not has_gpu:
        out.append(f"model.depth: {params.model.depth}: DenseNet-40 trains at about 18 images/s on 2 CPU cores "
                   "(bench/train_throughput.py); this machine has no GPU, so expect days: run it where one is")
    return out
