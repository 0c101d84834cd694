"""Per-step costs of the quality stage's passes on its MLP (thesis protocol, float64, one thread):
the op floor (a training gradient; a gradient-plus-HVP by double backward) beside the exact
and float forward and reverse passes, best of `repeats` runs of T steps taken round robin.
Writes JSON. PIPELINE_COMPILE=0 times the exact passes with eager (unfused) kernels. The
lockstep_* fields time exact and float reverse steps alternately (medians per step): the ratio
to quote on a machine whose speed drifts.

Run it against two checkouts (PYTHONPATH) in one session to compare code side by side:

    python bench/reverse_costs.py --steps 300 --out bench/results/reverse_costs.json
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import click
import torch

from pipeline.config import load_params
from pipeline.experiments import quality
from pipeline.hypergrad import ExactPath, FloatPath
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.hypergrad.reverse import Reversal, reverse
from pipeline.training import setup_device


def lockstep_ratio(problem, coef, l2, hvp) -> dict:
    """Exact and float reverse steps timed alternately, step by step: both see the same phase of
    the machine's speed, so their ratio is steadier than that of two separate passes."""
    exact = Reversal(problem, ExactPath.train(problem, coef), l2, hvp)
    plain = Reversal(problem, FloatPath.train(problem, coef), l2, hvp)
    times = {"exact": [], "float": []}
    for s in reversed(range(problem.steps)):
        for name, state in (("exact", exact), ("float", plain)):
            start = time.perf_counter()
            state.step(s)
            times[name].append(time.perf_counter() - start)
    exact.result()  # the round trip must hold, or the timing is of a broken reversal
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"lockstep_exact_reverse_ms": round(1e3 * median["exact"], 4),
            "lockstep_float_reverse_ms": round(1e3 * median["float"], 4),
            "lockstep_exact_over_float": round(median["exact"] / median["float"], 3)}


@click.command(help=__doc__)
@click.option("--steps", default=300, show_default=True)
@click.option("--repeats", default=5, show_default=True, help="Round-robin repetitions; the best of each is kept.")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--out", default="bench/results/reverse_costs.json", show_default=True)
def main(steps: int, repeats: int, params_file: str, out: str) -> None:
    params = load_params(params_file)
    device = setup_device("cpu", 1)
    cfg = params.quality
    protocol = cfg.protocols["thesis"]
    splits, info = quality.load_data(cfg, protocol)
    problem = quality.build_problem(cfg, protocol, params.seed, steps, splits, info, device)
    l2 = quality.penalty(problem, protocol, device)
    coef, hvp = problem.l2_coefficients(l2), HVP_METHODS["double_backward"]

    w, dv = problem.w0.clone(), torch.ones_like(problem.w0)
    passes = {  # name: (setup, timed pass)
        "grad_ms": (lambda: None, lambda _: [problem.train_grad(w, t) for t in range(steps)]),
        "grad_and_hvp_ms": (lambda: None, lambda _: [hvp(problem, w, t, dv) for t in range(steps)]),
        "exact_forward_ms": (lambda: None, lambda _: ExactPath.train(problem, coef)),
        "float_forward_ms": (lambda: None, lambda _: FloatPath.train(problem, coef)),
        "exact_reverse_ms": (lambda: ExactPath.train(problem, coef), lambda p: reverse(problem, p, l2, hvp)),
        "float_reverse_ms": (lambda: FloatPath.train(problem, coef), lambda p: reverse(problem, p, l2, hvp)),
    }
    # Round robin, best of `repeats` each: the machine's speed drifts, so every pass sees every phase.
    best = dict.fromkeys(passes, float("inf"))
    for _ in range(repeats):
        for name, (setup, timed) in passes.items():
            state = setup()
            start = time.perf_counter()
            timed(state)
            best[name] = min(best[name], time.perf_counter() - start)
    row = {"steps": steps, "params": problem.numel, "repeats": repeats, "compile": os.environ.get("PIPELINE_COMPILE", "auto"),
           **{name: round(1e3 * b / steps, 4) for name, b in best.items()}}
    row["exact_over_float_reverse"] = round(row["exact_reverse_ms"] / row["float_reverse_ms"], 3)
    row.update(lockstep_ratio(problem, coef, l2, hvp))
    row["exact_and_float_over_floor"] = round(
        (row["exact_forward_ms"] + row["float_forward_ms"] + row["exact_reverse_ms"] + row["float_reverse_ms"])
        / (2 * row["grad_ms"] + 2 * row["grad_and_hvp_ms"]), 3)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(row, indent=2) + "\n")
    click.echo(json.dumps(row))


if __name__ == "__main__":
    main()
