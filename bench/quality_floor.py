"""The quality stage's hypergradient work against the plain MLP's op floor, side by side in one
process. Per round: the floor's op costs (`work.step_costs`: a training gradient and a
gradient-plus-HVP at the stage's batch size, on the plain 784-50-50-50-10 MLP without w = e^s * z,
and on the stage's own scaled MLP), then one meta-iteration's hypergradients of variant VARIANT exactly as
the stage computes them with its exact half in this process (`quality.hypergradients`: exact and
float training, every reversal, DrMAD, DrMAD2, the peers), then the op costs again. The floor is
2T gradients plus one gradient-plus-HVP per counted reverse step, each op at its faster reading
(as `op_floor` takes it). Both clocks: wall seconds, and this process's CPU seconds, which
other processes on shared cores inflate far less (a long run averages their load while the short
floor readings keep their best moment, so the wall ratio overstates under load). The first round
includes any torch.compile (PIPELINE_COMPILE). Writes JSON.

Run it against two checkouts (PYTHONPATH) to compare code:

    python bench/quality_floor.py --variant thesis-2000 --repeats 3 --out bench/results/quality_floor_thesis-2000.json
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import click
import torch

from pipeline import machine, quality_mlp
from pipeline.config import load_params
from pipeline.experiments import quality
from pipeline.hypergrad import Problem
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.models import MLP
from pipeline.op_floor import op_floor
from pipeline.training import setup_device
from pipeline.work import step_costs

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def plain_problem(scaled: Problem, hidden: tuple[int, ...], activation: str) -> Problem:
    """The stage's problem (data, batches, steps) on the plain MLP: weights used as they are."""
    model = MLP((scaled.x.shape[1], *hidden, int(scaled.y.max()) + 1), activation=activation).to(scaled.dtype)
    return Problem(model, scaled.x, scaled.y, scaled.val_x, scaled.val_y, alpha=scaled.alpha, beta=scaled.beta,
                   batch_size=scaled.batch_size, seed=scaled.seed)


@click.command(help=__doc__)
@click.option("--variant", "name", default="thesis-2000", show_default=True, help="A key of quality.variants.")
@click.option("--repeats", default=3, show_default=True, help="Rounds (floor, hypergradients, floor).")
@click.option("--params", "params_file", default="params.yaml", show_default=True)
@click.option("--out", default="bench/results/quality_floor.json", show_default=True)
def main(name: str, repeats: int, params_file: str, out: str) -> None:
    params = load_params(params_file)
    cfg = params.quality
    device = setup_device(params.device, params.threads)
    protocol, steps = cfg.protocol(name), cfg.variants[name].steps
    splits, info = quality_mlp.load_data(cfg, protocol)
    problem = quality_mlp.build_problem(cfg, protocol, params.seed, steps, splits, info, device)
    plain = plain_problem(problem, tuple(protocol.hidden), protocol.activation)
    l2, hvp = quality_mlp.penalty(problem, protocol, device), HVP_METHODS[params.hvp]

    models = {"plain": plain, "scaled": problem}
    rounds = []
    for i in range(repeats):
        # each clock's own floor: wall seconds, and CPU seconds (what other processes barely inflate)
        costs = {(m, c): [step_costs(p, hvp, clock=CLOCKS[c])] for m, p in models.items() for c in CLOCKS}
        start = {c: clock() for c, clock in CLOCKS.items()}
        got = quality.hypergradients(quality.Setup(problem, l2, cfg, protocol, hvp))
        seconds = {c: clock() - start[c] for c, clock in CLOCKS.items()}
        for (m, c), readings in costs.items():
            readings.append(step_costs(models[m], hvp, clock=CLOCKS[c]))
        walked = [{"meta_iteration": 0, "hvps": w["hvps"]} for w in got["work"].values()]
        row = {"round": i, "hvps": sum(w["hvps"] for w in walked)}
        for (m, c), readings in costs.items():
            floor = op_floor(steps, readings, walked, seconds[c], seconds[c])
            row[f"{c}_s"] = round(seconds[c], 2)
            row.update({f"{m}_{c}_floor_s": floor["floor_time_s"], f"{m}_{c}_grad_ms": floor["floor_time_grad_ms"],
                        f"{m}_{c}_hvp_ms": floor["floor_time_hvp_ms"], f"{m}_{c}_ratio": floor["wall_over_floor"]})
        rounds.append(row)
        click.echo(json.dumps(row))
    summary = {"run": name, "steps": steps, "params": problem.numel, "threads": torch.get_num_threads(),
               "compile": os.environ.get("PIPELINE_COMPILE", "auto"), "platform": machine.describe(device)}
    for c in CLOCKS:
        ratios = [r[f"plain_{c}_ratio"] for r in rounds]
        summary.update({f"{c}_best_over_plain_floor": min(ratios), f"{c}_median_over_plain_floor": statistics.median(ratios),
                        f"{c}_spread_over_plain_floor": round(max(ratios) - min(ratios), 3),
                        f"{c}_best_s": min(r[f"{c}_s"] for r in rounds)})
    summary["rounds"] = rounds
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    click.echo(json.dumps({k: v for k, v in summary.items() if k != "rounds"}))


if __name__ == "__main__":
    main()
