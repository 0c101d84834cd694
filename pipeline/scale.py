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


# -- the paper scale, shrunk: every setting the paper's but lengths and data sizes --------------

# What `smoke` may change, as key paths into the settings (`*` matches any one key: a variant, a
# quality run): lengths (epochs, steps, meta-iterations, trials, seeds, reverse and Neumann steps)
# and data sizes. Everything else stays the paper's: tests/test_paper_smoke.py checks the two
# settings differ only here.
SMOKE_LENGTHS = (
    "data.val_size",
    "baseline.epochs",
    "drmad.meta_iterations", "drmad.epochs_start", "drmad.epochs_start_by_init", "drmad.epochs_cap",
    "drmad.max_reverse_steps",
    "adaptive.epochs", "adaptive.variants.*.every", "adaptive.variants.*.window", "adaptive.variants.*.val_size",
    "quality.data.train_size", "quality.data.val_size", "quality.data.test_size",
    "quality.variants.*.steps", "quality.variants.*.meta_iterations", "quality.meta_iterations", "quality.drmad_steps",
    "quality.max_reverse_steps", "quality.last", "quality.truncate", "quality.neumann_terms",
    "trajectory.steps", "trajectory.every",
    "search.trial_epochs", "search.tpe_startup_trials", "search.budget",
    "final.seeds",
    "arena.seeds", "arena.steps", "arena.budget", "arena.tpe_startup_trials",
)

# The data `smoke` runs on, written in torchvision's formats under data.root (tests/fake_datasets.py):
# CIFAR-10 5 x 16 training images (val 16, train the 64 left: one batch of 64 an epoch), 16 test
# images; MNIST 200 training and 60 test images.
SMOKE_DATA = {"cifar10": (80, 16), "mnist": (200, 60)}

_SMOKE = {
    "data": {"val_size": 16},  # train_size and test_size stay null: the rest of the pool, the own test split
    "baseline": {"epochs": 2},  # one step an epoch: the schedule's first drop falls on step 1
    # meta-iterations of 2 then 3 epochs (-4.0), 1 then 1 (-2.0, -7.0: the thesis' short starts), x1.4, cap 3
    "drmad": {"meta_iterations": 2, "epochs_start": 2, "epochs_start_by_init": {-2.0: 1, -7.0: 1}, "epochs_cap": 3,
              "max_reverse_steps": 1},
    # one hyper-update each (K steps, through the last M), the re-split holding out 10 and 14 of 80
    "adaptive": {"epochs": 2, "variants": {"k100": {"every": 2, "window": 2, "val_size": 10},
                                           "k131": {"every": 2, "window": 1, "val_size": 14}}},
    "quality": {"data": {"train_size": 150, "val_size": 50, "test_size": 50},
                # the paper's T = 200, 2,000, 20,000, 200,000 as 20, 30, 40, 50 (DrMAD's heuristic reads 20 steps)
                "variants": {"thesis-200": {"steps": 20}, "thesis-2000": {"steps": 30},
                            "thesis-20000": {"steps": 40, "meta_iterations": 2},
                            "thesis-200000": {"steps": 50, "meta_iterations": 1},
                            "relu_uncentred-200": {"steps": 20, "meta_iterations": 2},
                            "relu_uncentred-2000": {"steps": 30, "meta_iterations": 2}},
                "meta_iterations": 2, "drmad_steps": 5, "max_reverse_steps": 50, "last": 5, "truncate": [5, "S"],
                "neumann_terms": [1, 2, 3]},
    "trajectory": {"steps": 20, "every": 5},
    "search": {"trial_epochs": 1, "tpe_startup_trials": 1, "budget": 2},  # two trials of one step each
    "final": {"seeds": [1, 2]},
    "arena": {"seeds": [0, 1], "steps": 20, "budget": 120, "tpe_startup_trials": 1},
}


def smoke(settings: dict) -> dict:
    """The paper scale's `settings` (params.yaml after `pipeline scale paper`) with only lengths
    and data sizes shrunk, for a run on SMOKE_DATA on a CPU (tens of minutes): DenseNet-40, the paper's
    schedules, DrMAD's epoch growth, the adaptive variants' hyper-updates and the quality variants,
    every stage. A new copy; `settings` is not modified."""
    import copy
    return merge(copy.deepcopy(settings), copy.deepcopy(_SMOKE))
