"""Per-step costs of the quality stage's passes on its MLP (thesis protocol, float64, one thread):
the op floor (a training gradient; a gradient-plus-HVP by double backward) beside the exact
and float forward and reverse passes, best of three runs of T steps. Writes JSON.

Run it against two checkouts (PYTHONPATH) in one session to compare code side by side:

    python bench/reverse_costs.py --steps 300 --out bench/results/reverse_costs.json
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch

from pipeline.config import load_params
from pipeline.experiments import quality
from pipeline.hypergrad import ExactPath, FloatPath
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.hypergrad.reverse import reverse
from pipeline.training import setup_device


@click.command(help=__doc__)
@click.option("--steps", default=300, show_default=True)
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--out", default="bench/results/reverse_costs.json", show_default=True)
def main(steps: int, params_file: str, out: str) -> None:
    params = load_params(params_file)
    device = setup_device("cpu", 1)
    cfg = params.quality
    protocol = cfg.protocols["thesis"]
    splits, meta = quality.load_data(cfg, protocol)
    problem = quality.build_problem(cfg, protocol, params.seed, steps, splits, meta, device)
    l2 = quality.penalty(problem, protocol, device)
    coef, hvp = problem.l2_coefficients(l2), HVP_METHODS["double_backward"]

    def ms_per_step(fn, setup=lambda: None) -> float:
        best = float("inf")
        for _ in range(3):
            state = setup()
            start = time.perf_counter()
            fn(state)
            best = min(best, time.perf_counter() - start)
        return round(1e3 * best / steps, 4)

    w, dv = problem.w0.clone(), torch.ones_like(problem.w0)
    row = {"steps": steps, "params": problem.numel,
           "grad_ms": ms_per_step(lambda _: [problem.train_grad(w, t) for t in range(steps)]),
           "grad_and_hvp_ms": ms_per_step(lambda _: [hvp(problem, w, t, dv) for t in range(steps)]),
           "exact_forward_ms": ms_per_step(lambda _: ExactPath.train(problem, coef)),
           "float_forward_ms": ms_per_step(lambda _: FloatPath.train(problem, coef)),
           "exact_reverse_ms": ms_per_step(lambda p: reverse(problem, p, l2, hvp), lambda: ExactPath.train(problem, coef)),
           "float_reverse_ms": ms_per_step(lambda p: reverse(problem, p, l2, hvp), lambda: FloatPath.train(problem, coef))}
    row["exact_over_float_reverse"] = round(row["exact_reverse_ms"] / row["float_reverse_ms"], 3)
    row["exact_and_float_over_floor"] = round(
        (row["exact_forward_ms"] + row["float_forward_ms"] + row["exact_reverse_ms"] + row["float_reverse_ms"])
        / (2 * row["grad_ms"] + 2 * row["grad_and_hvp_ms"]), 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(row, indent=2) + "\n")
    click.echo(json.dumps(row))


if __name__ == "__main__":
    main()
