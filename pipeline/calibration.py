"""Seconds per step on this device, measured once and cached: what `pipeline plan` turns counted work into.

A calibration times a few steps of one model at one batch size with the functions the stages
run (`work.step_costs`: a training gradient, and a gradient plus HVP by `params.hvp`), one
evaluation forward per image, and the bytes autograd saves for backward in one training step
(the activations). Entries are cached in `.cache/plan/calibration.json` in the repository root
(outside the package: nothing is written into `pipeline/`), keyed by everything they depend on:
device name, torch version, the model's shape, batch size, dtype, HVP method and threads. A
changed key is measured again; `bench/gpu.py` writes the same entries for a GPU
(`.cache/plan/cuda.json`), so a CPU machine can plan a GPU run from them.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

CACHE = Path(".cache/plan")
CPU_FILE, CUDA_FILE = "calibration.json", "cuda.json"
# Image shape (channels, height, width) of each data source: the DenseNet's input.
SHAPES = {"digits": (1, 8, 8), "mnist5k": (1, 28, 28), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
NUM_CLASSES = 10
TARGET_S = 0.6  # seconds one timed pass aims for (two passes each for gradient and HVP)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    from pipeline import machine
    return f"cpu:{machine.processor()}"


def key(device: str, spec: dict) -> str:
    """The cache key: the device, torch's version and every setting the timing depends on."""
    return json.dumps({"device": device, "torch": torch.__version__, **spec}, sort_keys=True)


def densenet_spec(model, source: str, batch: int, eval_batch: int, hvp: str, threads: int) -> dict:
    return {"model": "densenet", "depth": model.depth, "growth_rate": model.growth_rate, "init_maps": model.init_maps,
            "dropout": model.dropout, "shape": list(SHAPES[source]), "batch": batch, "eval_batch": eval_batch,
            "dtype": "float32", "hvp": hvp, "threads": threads}


def mlp_spec(protocol, dtype: str, hvp: str, threads: int) -> dict:
    return {"model": "mlp", "hidden": list(protocol.hidden), "activation": protocol.activation,
            "scaled_biases": protocol.biases == "scaled", "inputs": 784, "batch": protocol.batch_size,
            "eval_batch": protocol.batch_size, "dtype": dtype, "hvp": hvp, "threads": threads}


def _problem(spec: dict, device: torch.device, steps: int):
    """A hypergradient Problem of the spec's model on random data of its shape (timing only)."""
    from pipeline.hypergrad import Problem
    from pipeline.models import MLP, DenseNet
    dtype = getattr(torch, spec["dtype"])
    g = torch.Generator().manual_seed(0)
    batch = spec["batch"]
    if spec["model"] == "densenet":
        shape = tuple(spec["shape"])
        torch.manual_seed(0)
        model = DenseNet(spec["depth"], spec["growth_rate"], spec["init_maps"], spec["dropout"], in_channels=shape[0],
                         num_classes=NUM_CLASSES)
    else:
        shape = (spec["inputs"],)
        torch.manual_seed(0)
        model = MLP((spec["inputs"], *spec["hidden"], NUM_CLASSES), scaled=True, activation=spec["activation"],
                    scaled_biases=spec["scaled_biases"])
    model = model.to(device, dtype)
    n = batch * 4
    x = torch.randn(n, *shape, generator=g).to(device, dtype)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g).to(device)
    scales = None
    if spec["model"] == "mlp":
        from pipeline.hyper import HyperSpace
        scales = HyperSpace.scales(model, 0.0, bounds=(-3.0, 3.0), device=device)
    return Problem(model, x, y, x[:batch], y[:batch], alpha=torch.full((steps,), 0.05, dtype=torch.float64),
                   beta=torch.full((steps,), 0.9, dtype=torch.float64), batch_size=batch, seed=0, scales=scales)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(spec: dict, device: torch.device) -> dict:
    """Seconds per training gradient, per gradient + HVP and per evaluated image; activation bytes."""
    from pipeline.hypergrad.hvp import HVP_METHODS
    from pipeline.work import step_costs
    torch.set_num_threads(spec["threads"])
    hvp = HVP_METHODS[spec["hvp"]]
    probe = _problem(spec, device, 4)
    start = time.perf_counter()
    hvp(probe, probe.w0, 0, torch.ones_like(probe.w0))  # warm-up, and the size of one step
    _sync(device)
    sample = max(1, min(50, math.ceil(TARGET_S / max(time.perf_counter() - start, 1e-6))))
    problem = _problem(spec, device, sample)
    problem.train_grad(problem.w0, 0)
    grad_s, both_s = step_costs(problem, hvp, sample)
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        problem.train_grad(problem.w0, 0)
    model, x = problem.model, problem.x
    model.eval()
    with torch.no_grad():
        model(x[: spec["eval_batch"]])
        _sync(device)
        start, images = time.perf_counter(), 0
        while time.perf_counter() - start < TARGET_S / 3:
            images += len(model(x[: spec["eval_batch"]]))
            _sync(device)
        eval_s = (time.perf_counter() - start) / images
    return {"grad_s": grad_s, "hvp_s": max(both_s, grad_s), "eval_image_s": eval_s, "activation_bytes": saved[0],
            "params": problem.numel, "measured": time.strftime("%Y-%m-%d")}


def startup_seconds() -> float:
    """A stage process's start: the interpreter, torch, MLflow and the pipeline imported."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, mlflow, optuna, pipeline.experiments.drmad, "
                    "pipeline.experiments.quality"], check=True, capture_output=True, env={**os.environ})
    return time.perf_counter() - start


class Calibration:
    """The cached entries of one device; `get` measures what is missing (unless read-only)."""

    def __init__(self, path: Path, device: torch.device | None, name: str):
        self.path, self.device, self.name = path, device, name
        self.entries: dict = json.loads(path.read_text()) if path.is_file() else {}
        self.measured: list[str] = []  # keys measured in this process

    def get(self, spec: dict) -> dict | None:
        k = key(self.name, spec)
        if k not in self.entries and self.device is not None:
            self.entries[k] = measure(spec, self.device)
            self.measured.append(k)
            self.save()
        return self.entries.get(k)

    def startup(self) -> float | None:
        k = key(self.name, {"startup": True})
        if k not in self.entries and self.device is not None:
            self.entries[k] = {"startup_s": startup_seconds()}
            self.save()
        return self.entries.get(k, {}).get("startup_s")

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.entries, indent=1, sort_keys=True) + "\n")
        tmp.replace(self.path)
