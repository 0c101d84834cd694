"""Intra-op threads per stage model: one training step (gradient and update) timed at 1 and at
2 threads, each setting in its own process, on an otherwise idle machine and while a second
process competes for the cores (as a queue worker, a pytest worker or a torchrun rank would).
Writes bench/results/threads.json; `threads: auto` in params.yaml follows what it found.

    python bench/threads.py
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODELS = {  # name: (model, input shape, batch): the stages' models at their default and paper scales
    "mlp_quality": ("mlp", (784,), 50),
    "densenet10_digits": ("densenet10", (1, 8, 8), 64),
    "densenet40_cifar": ("densenet40", (3, 32, 32), 64),
}


def step_ms(model_name: str, threads: int, seconds: float = 6.0) -> float:
    import torch
    from torch.nn import functional as F

    from pipeline.models import MLP, DenseNet, dropout_masks

    torch.set_num_threads(threads)
    kind, shape, batch = MODELS[model_name]
    if kind == "mlp":
        model = MLP((784, 50, 50, 50, 10)).double()
        x = torch.randn(batch, *shape, dtype=torch.float64)
    else:
        model = DenseNet(depth=10 if kind == "densenet10" else 40, in_channels=shape[0])
        x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)

    def step():
        with dropout_masks(model, g):
            loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            torch._foreach_add_(params, grads, alpha=-1e-3)

    step()
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        n += 1
    return 1e3 * (time.perf_counter() - start) / n


def measure(model_name: str, threads: int, competitor: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    hog = None
    if competitor:  # a second process on the cores, at the same setting
        hog = subprocess.Popen([sys.executable, __file__, "--step", model_name, str(threads), "60"], env=env,
                               stdout=subprocess.DEVNULL)
        time.sleep(2.0)
    try:
        out = subprocess.run([sys.executable, __file__, "--step", model_name, str(threads), "6"], env=env,
                             capture_output=True, text=True, check=True).stdout
    finally:
        if hog:
            hog.kill()
    return float(out.strip())


def main() -> None:
    rows = []
    for name in MODELS:
        for competitor in (False, True):
            for threads in (1, 2):
                ms = measure(name, threads, competitor)
                rows.append({"model": name, "threads": threads, "shared": competitor, "step_ms": round(ms, 3)})
                print(rows[-1], flush=True)
    out = Path(__file__).parent / "results" / "threads.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"cores": os.cpu_count(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--step"]:
        print(step_ms(sys.argv[2], int(sys.argv[3]), float(sys.argv[4])))
    else:
        main()
