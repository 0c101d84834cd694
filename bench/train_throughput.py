"""DenseNet-40 training throughput, and the share of step time spent outside forward/backward.

Writes JSON (default bench/results/train_throughput.json). "Outside" is everything a training
step does besides the model's forward and backward: batch gathering, mask generators, the L2
term, the SGD update and metric accumulation. Goal: < 5%.

    python bench/train_throughput.py [--device auto] [--steps 8]
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import click
import torch
from torch.nn import functional as F

from pipeline.config import TrainConfig
from pipeline.models import DenseNet, dropout_masks
from pipeline.training import Trainer, setup_device


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(shape: tuple[int, int, int], batch: int, steps: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = DenseNet(in_channels=shape[0]).to(device)
    n = batch * (steps + 1)
    x, y = torch.randn(n, *shape, device=device), torch.randint(0, 10, (n,), device=device)
    trainer = Trainer(model, x, y, TrainConfig(epochs=1000, batch_size=batch), seed=0)

    model.train()
    xb, yb = x[:batch], y[:batch]
    gen = torch.Generator(device=device).manual_seed(0)

    def forward_backward() -> None:
        with dropout_masks(model, gen):
            loss = F.cross_entropy(model(xb), yb)
        torch.autograd.grad(loss, trainer.params)

    def full_step(step: int) -> None:  # what Trainer.run_epoch does per step
        trainer.update(step, trainer.grad(step)[0])

    # Interleaved and summarised by medians, so background load hits both timings alike.
    core, total = [], []
    for step in range(steps + 1):
        for fn, times in ((forward_backward, core), (lambda: full_step(step), total)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    core, total = statistics.median(core[1:]), statistics.median(total[1:])  # first: warm-up
    return {"input": list(shape), "batch_size": batch, "steps": steps,
            "images_per_s": round(batch / total, 1),
            "step_ms": round(1000 * total, 2),
            "forward_backward_ms": round(1000 * core, 2),
            "share_outside_forward_backward": round(1 - core / total, 4)}  # noise may dip it below 0


@click.command(help=__doc__)
@click.option("--device", default="auto", show_default=True)
@click.option("--steps", default=8, show_default=True, help="Timed steps per input shape.")
@click.option("--out", default="bench/results/train_throughput.json", show_default=True)
def main(device: str, steps: int, out: str) -> None:
    dev = setup_device(device)
    results = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
               "machine": platform.processor() or platform.machine(),
               "cuda": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               "runs": [measure((1, 8, 8), 64, 4 * steps, dev), measure((3, 32, 32), 64, steps, dev)]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    click.echo(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
