"""Dataset preparation: splits, train-only normalisation, determinism, torchvision folders
(faked in their on-disk formats) and atomic output."""
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from pipeline import data
from pipeline.config import DataConfig


def denormalise(x, info):
    """Back to the [0, 1] pixels prepare started from."""
    mean, std = (torch.tensor(info[k]).view(-1, 1, 1) for k in ("mean", "std"))
    return x * std + mean


def assert_split_files(out, info, shape, sizes):
    assert info["sizes"] == sizes
    assert (info["channels"], info["height"], info["width"]) == shape
    for split, n in sizes.items():
        x, y = data.load_split(out, split)
        assert x.shape == (n, *shape) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
    x, _ = data.load_split(out, "train")
    per_channel = x.transpose(0, 1).reshape(shape[0], -1).double()
    assert per_channel.mean(1).tolist() == pytest.approx([0.0] * shape[0], abs=1e-5)
    assert per_channel.std(1, unbiased=False).tolist() == pytest.approx([1.0] * shape[0], abs=1e-4)
    assert data.load_info(out) == info


def assert_rows_from(out, info, split, pixels, labels, peak):
    """Each image of `split` is exactly the source image its split index names."""
    x, y = data.load_split(out, split)
    assert torch.equal(torch.round(denormalise(x, info) * peak).to(torch.uint8), pixels)
    assert torch.equal(y, labels)


# -- digits and mnist5k (shipped in pip packages) --------------------------------------------

DIGITS = dict(source="digits", val_size=200, test_size=300, train_size=1000)


def test_digits_sizes_shapes_and_train_normalisation(tmp_path):
    info = data.prepare(DataConfig(**DIGITS), tmp_path / "p")
    assert info["source"] == "digits" and info["num_classes"] == 10
    assert_split_files(tmp_path / "p", info, (1, 8, 8), {"train": 1000, "val": 200, "test": 300})


def test_digits_splits_are_disjoint_and_hold_the_indexed_images(tmp_path):
    from sklearn.datasets import load_digits
    cfg = DataConfig(**{**DIGITS, "train_size": None})
    idx = data.split_indices(cfg, 1797, 0)
    assert {k: len(v) for k, v in idx.items()} == {"train": 1297, "val": 200, "test": 300}
    everything = torch.cat(list(idx.values()))
    assert len(set(everything.tolist())) == len(everything) == 1797  # disjoint, and "rest" is all

    info = data.prepare(cfg, tmp_path / "p")
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    for split, i in idx.items():
        assert_rows_from(tmp_path / "p", info, split, pixels[i], labels[i], peak=16)


def test_digits_same_params_same_digest_other_seed_other_digest(tmp_path):
    a = data.prepare(DataConfig(**DIGITS), tmp_path / "a")
    b = data.prepare(DataConfig(**DIGITS), tmp_path / "b")
    c = data.prepare(DataConfig(**DIGITS, seed=1), tmp_path / "c")
    assert a["digest"] == b["digest"] != c["digest"]
    for name in ("train.pt", "val.pt", "test.pt", "info.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_mnist5k_shapes_and_sizes(tmp_path):
    cfg = DataConfig(source="mnist5k", val_size=500, test_size=1000)
    info = data.prepare(cfg, tmp_path / "p")
    assert_split_files(tmp_path / "p", info, (1, 28, 28), {"train": 3500, "val": 500, "test": 1000})


# -- torchvision sources, faked in their on-disk formats --------------------------------------

def _pixels(rng, n, shape, low, high):
    return rng.integers(low, high, size=(n, *shape), dtype=np.uint8)


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """cifar-10-batches-py with 5 x 8 training and 12 test images; returns (root, train, test).

    Test images are much brighter than training ones, so normalising with anything but the
    training statistics shows in the train split's mean. Channels differ too, to catch mixups."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    ranges = [(0, 60), (40, 120), (100, 200)]
    train = np.concatenate([_pixels(rng, 40, (1, 32, 32), lo, hi) for lo, hi in ranges], axis=1)
    test = _pixels(rng, 12, (3, 32, 32), 200, 256)
    train_y, test_y = rng.integers(0, 10, 40), rng.integers(0, 10, 12)

    def dump(name, obj):
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f)

    # torchvision unpickles with encoding="latin1" and reads the str keys "data" and "labels";
    # each row is 3072 bytes: the R plane, then G, then B, each 32 x 32 row-major.
    for b in range(5):
        rows = slice(8 * b, 8 * b + 8)
        dump(f"data_batch_{b + 1}",
             {"data": train[rows].reshape(8, -1), "labels": train_y[rows].tolist()})
    dump("test_batch", {"data": test.reshape(12, -1), "labels": test_y.tolist()})
    dump("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})

    # torchvision checks each file's md5 against the real CIFAR-10's, which fake files cannot
    # match; only that check is replaced (by "the file exists"), the loader itself stays real.
    real = torchvision.datasets.cifar.check_integrity
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity",
                        lambda fpath, md5=None: real(fpath))
    as_tensors = lambda x, y: (torch.from_numpy(x), torch.from_numpy(y).long())  # noqa: E731
    return tmp_path / "raw", as_tensors(train, train_y), as_tensors(test, test_y)


def test_cifar10_real_loader_on_a_fake_folder(tmp_path, fake_cifar):
    root, (train_x, train_y), (test_x, test_y) = fake_cifar
    cfg = DataConfig(source="cifar10", root=str(root), val_size=10, train_size=25, test_size=8, seed=3)
    out = tmp_path / "p"
    info = data.prepare(cfg, out)
    assert_split_files(out, info, (3, 32, 32), {"train": 25, "val": 10, "test": 8})

    idx = data.split_indices(cfg, 40, 12)
    assert not set(idx["train"].tolist()) & set(idx["val"].tolist())
    # The stats are those of the 25 training images alone (not val, not the bright test split)...
    pixels = train_x[idx["train"]].double() / 255
    expected = pixels.transpose(0, 1).reshape(3, -1)
    assert info["mean"] == pytest.approx(expected.mean(1).tolist(), rel=1e-6)
    assert info["std"] == pytest.approx(expected.std(1, unbiased=False).tolist(), rel=1e-6)
    # ...and every split, test included, holds its indexed images normalised with them.
    assert_rows_from(out, info, "train", train_x[idx["train"]], train_y[idx["train"]], peak=255)
    assert_rows_from(out, info, "val", train_x[idx["val"]], train_y[idx["val"]], peak=255)
    assert_rows_from(out, info, "test", test_x[idx["test"]], test_y[idx["test"]], peak=255)


def test_cifar10_sizes_checked_against_the_folder(tmp_path, fake_cifar):
    root = str(fake_cifar[0])
    with pytest.raises(data.DataError, match=r"data\.train_size.*40"):
        data.prepare(DataConfig(source="cifar10", root=root, val_size=30, train_size=20), tmp_path / "p")
    with pytest.raises(data.DataError, match=r"data\.val_size"):
        data.prepare(DataConfig(source="cifar10", root=root, val_size=40), tmp_path / "p")
    with pytest.raises(data.DataError, match=r"data\.test_size.*12"):
        data.prepare(DataConfig(source="cifar10", root=root, test_size=13), tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_cifar10_missing_folder_says_how_to_fix(tmp_path):
    cfg = DataConfig(source="cifar10", root=str(tmp_path / "raw"))
    with pytest.raises(data.DataError, match="cifar-10-batches-py") as err:
        data.prepare(cfg, tmp_path / "p")
    assert "download" in str(err.value) and "\n" not in str(err.value)


def test_cifar10_corrupt_folder_is_a_data_error(tmp_path):
    (tmp_path / "raw" / "cifar-10-batches-py").mkdir(parents=True)  # real md5 check, no files
    with pytest.raises(data.DataError, match="download"):
        data.prepare(DataConfig(source="cifar10", root=str(tmp_path / "raw")), tmp_path / "p")


def _write_idx(path, array):
    """MNIST's idx format: magic 0x0000 0x08 (uint8) ndim, then big-endian int32 dims, then bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, array.ndim]))
        f.write(np.array(array.shape, dtype=">i4").tobytes())
        f.write(array.tobytes())


def test_mnist_real_loader_on_a_fake_folder(tmp_path):
    # torchvision's MNIST only checks that the raw files exist (no md5): nothing to patch.
    rng = np.random.default_rng(1)
    raw = tmp_path / "raw" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, test_x = _pixels(rng, 30, (28, 28), 0, 128), _pixels(rng, 10, (28, 28), 128, 256)
    train_y, test_y = rng.integers(0, 10, 30, dtype=np.uint8), rng.integers(0, 10, 10, dtype=np.uint8)
    for prefix, x, y in (("train", train_x, train_y), ("t10k", test_x, test_y)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", x)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", y)

    cfg = DataConfig(source="mnist", root=str(tmp_path / "raw"), val_size=5, test_size=None)
    out = tmp_path / "p"
    info = data.prepare(cfg, out)
    assert_split_files(out, info, (1, 28, 28), {"train": 25, "val": 5, "test": 10})
    idx = data.split_indices(cfg, 30, 10)
    pixels, labels = torch.from_numpy(test_x).unsqueeze(1), torch.from_numpy(test_y).long()
    assert_rows_from(out, info, "test", pixels[idx["test"]], labels[idx["test"]], peak=255)


# -- atomic output -----------------------------------------------------------------------------

def test_failed_write_leaves_previous_output_untouched(tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    data.prepare(DataConfig(**DIGITS), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_save, calls = torch.save, []

    def save_then_fail(obj, f, *args, **kwargs):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        data.prepare(DataConfig(**DIGITS, seed=7), out)
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert os.listdir(tmp_path) == ["prepared"]  # no temporary folder left beside it


def test_loading_before_prepare_is_a_data_error(tmp_path):
    with pytest.raises(data.DataError, match="prepare"):
        data.load_info(tmp_path)
    with pytest.raises(data.DataError, match="prepare"):
        data.load_split(tmp_path, "train")
