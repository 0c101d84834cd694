"""The GPU check, ready to run in under 5 minutes on one GPU (README "Wall times"). Writes JSON.

  training   DenseNet-40 training images/s on CIFAR-shaped input (batch 64), deterministic
             algorithms on (what every stage runs), then for the paths that are never reversed
             (baseline, finalists, search trials): channels-last, bf16 autocast, and both,
             each with its throughput relative to the deterministic float32 default
  exact      the exact reverse pass over one epoch of DenseNet-40 training (CIFAR-10's 50,000
             images at batch 64 = 781 steps; fewer with --steps): forward and reverse seconds,
             the bits-back buffer's size, and that it came back to w_0 bit for bit
  hvp        double backward vs forward-over-reverse on DenseNet-40: the faster one is what to
             set as `hvp` in params.yaml on this GPU (the benchmark changes no setting)
  calibration  `pipeline plan`'s seconds per step on this GPU for the models of params.yaml and of
             the paper scale, written to .cache/plan/cuda.json (--calibration): copy it to a
             machine without a GPU and `pipeline plan --device cuda` plans from it

    python bench/gpu.py                     # on a machine with CUDA
    python bench/gpu.py --smoke             # any machine: tiny sizes, checks that it runs
"""
from __future__ import annotations

import json
import time
from contextlib import nullcontext
from pathlib import Path

import click
import torch
from torch.nn import functional as F

from pipeline import machine
from pipeline.hypergrad import ExactPath, Problem
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.hypergrad.reverse import reverse
from pipeline.models import DenseNet, dropout_masks
from pipeline.training import setup_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def densenet(device: torch.device, shape: tuple[int, ...], channels_last: bool = False) -> DenseNet:
    torch.manual_seed(0)
    model = DenseNet(depth=40, in_channels=shape[0]).to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def images_per_s(device: torch.device, shape: tuple[int, ...], batch: int, steps: int,
                 channels_last: bool = False, bf16: bool = False) -> float:
    """Training steps (forward, backward, SGD update) on random CIFAR-shaped batches."""
    model = densenet(device, shape, channels_last)
    params = list(model.parameters())
    x = torch.randn(batch, *shape, device=device)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    y = torch.randint(0, 10, (batch,), device=device)
    g = torch.Generator(device=device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step() -> None:
        with autocast, dropout_masks(model, g):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-0.01)

    for _ in range(3):  # warm-up: kernels chosen, memory pooled
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - start)


def bench_training(device: torch.device, shape: tuple[int, ...], batch: int, steps: int) -> list[dict]:
    base = images_per_s(device, shape, batch, steps)
    rows = [{"variant": "float32, deterministic (every stage)", "images_per_s": round(base, 1), "relative": 1.0}]
    for name, kw in (("channels-last", {"channels_last": True}), ("bf16 autocast", {"bf16": True}),
                     ("channels-last + bf16 autocast", {"channels_last": True, "bf16": True})):
        ips = images_per_s(device, shape, batch, steps, **kw)
        rows.append({"variant": name, "images_per_s": round(ips, 1), "relative": round(ips / base, 3)})
    return rows


def problem(device: torch.device, shape: tuple[int, ...], batch: int, steps: int) -> Problem:
    model = densenet(device, shape)
    n = batch * max(2, steps // 4)  # a few epochs' worth of distinct images: batches recur like real ones
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, *shape, generator=g).to(device), torch.randint(0, 10, (n,), generator=g).to(device)
    vx, vy = torch.randn(batch, *shape, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)
    return Problem(model, x, y, vx, vy, alpha=torch.full((steps,), 0.1), beta=torch.full((steps,), 0.9),
                   batch_size=batch, seed=0)


def bench_exact(device: torch.device, shape: tuple[int, ...], batch: int, steps: int, hvp: str) -> dict:
    p = problem(device, shape, batch, steps)
    coef = p.l2_coefficients(None)
    sync(device)
    start = time.perf_counter()
    path = ExactPath.train(p, coef)
    sync(device)
    forward = time.perf_counter() - start
    buffer_bytes = 2 * path.buffer.stack.numel() + 8 * (path.buffer.x.numel() + path.buffer.top.numel())
    start = time.perf_counter()
    reverse(p, path, None, HVP_METHODS[hvp])  # raises unless back at w_0 bit for bit
    sync(device)
    backward = time.perf_counter() - start
    return {"steps": steps, "params": p.numel, "hvp": hvp, "forward_s": round(forward, 2),
            "reverse_s": round(backward, 2), "reverse_over_forward": round(backward / forward, 2),
            "buffer_mib": round(buffer_bytes / 2 ** 20, 1),
            "buffer_bits_per_param_step": round(8 * buffer_bytes / p.numel / steps, 3),
            "round_trip": "w_0 recovered bit for bit"}


def bench_hvp(device: torch.device, shape: tuple[int, ...], batch: int, repeats: int) -> list[dict]:
    p = problem(device, shape, batch, 2)
    dv = torch.randn_like(p.w0)
    rows = []
    for name, hvp in HVP_METHODS.items():
        hvp(p, p.w0, 0, dv)
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            hvp(p, p.w0, 0, dv)
        sync(device)
        rows.append({"hvp": name, "ms": round(1e3 * (time.perf_counter() - start) / repeats, 2)})
    fastest = min(rows, key=lambda r: r["ms"])["hvp"]
    return [{**r, "fastest": r["hvp"] == fastest} for r in rows]


def calibrate(device: torch.device, path: Path, smoke: bool = False) -> list[str]:
    """`pipeline plan`'s entries for this device: params.yaml's models and the paper scale's."""
    from pipeline import calibration, plan
    from pipeline.config import load_params
    from pipeline.scale import preview
    cal = calibration.Calibration(path, device, calibration.device_name(device))
    measured = []
    for params in (load_params(),) if smoke else (load_params(), preview("paper")):
        for model in (plan.DENSENET, plan.MLP):
            entry = cal.get(plan.spec(params, model))
            entry["device_memory"] = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
            measured.append(f"{model} {entry['grad_s'] * 1e3:.2f} ms/gradient")
    cal.startup()
    cal.save()
    return measured


@click.command(help=__doc__)
@click.option("--smoke", is_flag=True, help="Tiny sizes on any device: checks that the script runs.")
@click.option("--steps", default=781, show_default=True, help="Exact reverse pass length (one CIFAR epoch).")
@click.option("--out", default="bench/results/gpu.json", show_default=True, type=click.Path(dir_okay=False))
@click.option("--calibration", "calibration_file", default=".cache/plan/cuda.json", show_default=True,
              type=click.Path(dir_okay=False), help="Where `pipeline plan`'s GPU calibration goes.")
def main(smoke: bool, steps: int, out: str, calibration_file: str) -> None:
    device = setup_device("auto")  # deterministic algorithms on, as in every stage
    if device.type != "cuda" and not smoke:
        raise click.ClickException("no CUDA device here: run on a GPU machine, or pass --smoke")
    shape, batch, train_steps = ((3, 8, 8), 8, 2) if smoke else ((3, 32, 32), 64, 50)
    steps = 4 if smoke else steps
    started = time.perf_counter()
    result = {"platform": machine.describe(device), "smoke": smoke,
              "training": bench_training(device, shape, batch, train_steps),
              "hvp": bench_hvp(device, shape, batch, 2 if smoke else 10)}
    result["exact"] = bench_exact(device, shape, batch, steps, min(result["hvp"], key=lambda r: r["ms"])["hvp"])
    result["calibration"] = calibrate(device, Path(calibration_file), smoke)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
