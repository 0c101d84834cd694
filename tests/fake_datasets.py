"""Fake CIFAR-10 and MNIST in torchvision's on-disk formats, so that torchvision's own loaders read
them: CIFAR-10's python pickle batches (`cifar-10-batches-py/`) and MNIST's raw idx files
(`MNIST/raw/*-ubyte`). Pixels are seeded noise with a per-class offset (a learnable signal)."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR_BATCHES = 5  # data_batch_1 .. data_batch_5, as the real dataset ships them


def _images(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, n)
    noise = rng.integers(0, 160, size=(n, *shape))
    return (noise + 9 * labels.reshape(-1, *[1] * len(shape))).astype(np.uint8), labels


def write_cifar10(root: Path, n_train: int, n_test: int, seed: int = 0) -> Path:
    """root/cifar-10-batches-py: five training batches (n_train divisible by 5), test_batch and
    batches.meta, pickled as CIFAR-10's python version is: dicts with "data" (N x 3072 uint8 rows:
    the R, G, B planes, each 32 x 32 row-major) and "labels"."""
    if n_train % CIFAR_BATCHES:
        raise ValueError(f"n_train: a multiple of {CIFAR_BATCHES} (got {n_train})")
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)

    x, y = _images(rng, n_train, (3, 32, 32))
    per = n_train // CIFAR_BATCHES
    for b in range(CIFAR_BATCHES):
        rows = slice(b * per, (b + 1) * per)
        dump(f"data_batch_{b + 1}", {"batch_label": f"training batch {b + 1} of 5",
                                     "data": x[rows].reshape(per, -1), "labels": y[rows].tolist()})
    x, y = _images(rng, n_test, (3, 32, 32))
    dump("test_batch", {"batch_label": "testing batch 1 of 1", "data": x.reshape(n_test, -1), "labels": y.tolist()})
    dump("batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                          "ship", "truck"], "num_cases_per_batch": per, "num_vis": 3072})
    return folder


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The idx format: magic 0x0000 0x08 (unsigned bytes) ndim, big-endian int32 dims, then the bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]))
        f.write(np.array(array.shape, dtype=">i4").tobytes())
        f.write(array.astype(np.uint8).tobytes())


def write_mnist(root: Path, n_train: int, n_test: int, seed: int = 1) -> Path:
    """root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, uncompressed: what
    torchvision's MNIST reads, and finds present, without downloading."""
    rng = np.random.default_rng(seed)
    raw = Path(root) / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = _images(rng, n, (28, 28))
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)
    return raw
