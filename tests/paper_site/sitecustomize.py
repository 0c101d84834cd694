"""Imported at the start of every Python process whose PYTHONPATH names this folder (the paper
smoke test's `dvc repro` and its stages): fake CIFAR-10 files pass torchvision's integrity check,
and torchvision may not download.

torchvision's CIFAR10 checks each file's md5 against the real dataset's, which fake files cannot
match: only that check is replaced, by "the file exists" (MNIST's own check), once
torchvision.datasets.cifar is imported. The loader itself stays torchvision's. A download is an
error: nothing may reach the network in a test.
"""
import importlib.abc
import importlib.util
import sys

PATCHED = ("torchvision.datasets.cifar", "torchvision.datasets.utils")


def _exists_only(fpath, md5=None):
    import os
    return os.path.isfile(fpath)


def _no_download(*args, **kwargs):
    raise RuntimeError(f"torchvision tried to download {args[0] if args else kwargs} during a test")


def _patch(module) -> None:
    if module.__name__ == "torchvision.datasets.cifar":
        module.check_integrity = _exists_only
        module.download_and_extract_archive = _no_download
    else:
        module.download_url = module.download_and_extract_archive = _no_download


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in PATCHED:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            _patch(module)
        loader.exec_module = patched
        return spec


sys.meta_path.insert(0, _Finder())
