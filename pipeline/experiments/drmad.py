"""The `drmad` stage: meta-iterations tuning per-parameter log10 L2 of DenseNet with DrMAD.

Every meta-iteration trains from the same w_0, batch order and dropout masks (the seed), with
the current hyperparameters; DrMAD (or DrMAD2) gives the hypergradient of the validation loss;
a sign step with momentum moves the hyperparameters (algorithms §6). A non-finite loss, weight or
hypergradient ends the run as the outcome `diverged` with the last finite hyperparameters
kept; each completed meta-iteration is checkpointed, so an interrupted run resumes there and
ends with the same numbers.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import io, machine, plots
from pipeline.layout import DrmadOutputs
from pipeline.data import load_prepared
from pipeline.models import build_densenet
from pipeline.tracking import SILENT, Tracker
from pipeline.checkpoint import Checkpoint, fingerprint
from pipeline.config import ConfigError, Params
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import Problem
from pipeline.hypergrad.problem import flat
from pipeline.hypergrad.drmad import LinePath, drmad2_path, heuristic_steps, step_map
from pipeline.hypergrad.hvp import HVP_METHODS, recomputed_gradients
from pipeline.hypergrad.reverse import reverse
from pipeline.meta import MetaState, epochs_at, layer_summary, run_meta_iterations, sign_step
from pipeline.training import setup_device
from pipeline.training import Trainer, final_errors, finite_losses, train_epoch
from pipeline.experiments.summaries import hyper_quantiles
from pipeline.work import Work, step_costs


def parse_init(text: str, cfg) -> float:
    """The --init value: a number within drmad.bounds (any of drmad.inits, or another to try)."""
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--init: a number such as -4.0 (got {text!r})") from None
    low, high = cfg.bounds
    if not low <= value <= high:
        raise ConfigError(f"--init: must lie within drmad.bounds [{low}, {high}] (got {value})")
    return value


def problem_for(trainer: Trainer, splits: dict, seed: int, w0: torch.Tensor) -> Problem:
    """The hypergradient problem of a trainer's run: its steps, batches, masks, step sizes and
    momentum as trained (momentum as given, not the rational exact reversal would need: DrMAD
    reverses no velocity, DrMAD2 in floats), validation on the validation split."""
    steps = trainer.total_steps
    return Problem(trainer.model, *splits["train"], *splits["val"],
                   alpha=torch.tensor([trainer.alpha(t) for t in range(steps)], dtype=torch.float64),
                   beta=torch.full((steps,), trainer.cfg.momentum, dtype=torch.float64), batch_size=trainer.cfg.batch_size,
                   seed=seed, w0=w0, exact_beta=False)


def reverse_path(params: Params, problem: Problem, trainer: Trainer, distances: torch.Tensor):
    """DrMAD's line from w_0 to w_T, or DrMAD2's float reversal of the last K steps first."""
    cfg = params.drmad
    w_T, v_T = flat(trainer.params), flat(trainer.state.velocity)

    def line_steps(d: torch.Tensor) -> int:
        return cfg.reverse_steps or min(heuristic_steps(d, cfg.multiplier), cfg.max_reverse_steps)

    if cfg.method == "drmad":
        s = line_steps(distances)
        return LinePath(problem.w0, w_T, s, step_map(cfg.step_map, s, problem.steps, distances))
    return drmad2_path(problem, w_T, v_T, distances, cfg.last, line_steps, cfg.step_map)


def chosen_instead(chosen: dict | None, epochs: int, val_error: float) -> bool:
    """Does a meta-iteration of `epochs` epochs and `val_error` replace the choice so far? Only a
    longer training, or an equally long one with a lower error, does (ties: the earlier stays)."""
    if chosen is None or epochs > chosen.get("epochs", 0):
        return True
    return epochs == chosen["epochs"] and val_error < chosen["val_error"]


def finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


class DrmadState(MetaState):
    """One initialisation's meta-iterations. `chosen`, what the finalists retrain (`tune` and
    `final` stages): the hyperparameters of the meta-iteration with the best validation error
    among those trained longest (epochs grow to a cap: a longer training's lower error says nothing
    about its hyperparameters), the earliest among equals; {meta_iteration, epochs, val_error,
    l2_coefficients}."""

    def __init__(self, hypers: HyperSpace, start_epochs: int):
        super().__init__(hypers, ("meta", "epochs", "layers"))
        self.start_epochs = start_epochs


def meta_iteration(params: Params, state: DrmadState, splits: dict, info: dict, device: torch.device,
                   tracker: Tracker) -> bool:
    """Train, take the DrMAD hypergradient, step the hyperparameters. False when it diverged."""
    cfg, i = params.drmad, state.iteration
    start = time.perf_counter()
    model = build_densenet(params.model, info, params.seed).to(device)
    w0 = flat(model.parameters())
    coefs = {n: 2 * state.hypers.value(n) for n in state.hypers.shapes}
    trainer = Trainer(model, *splits["train"], cfg.train_config(epochs_at(i, state.start_epochs, cfg.epochs_growth,
                      cfg.epochs_cap)), params.seed, coefs, track_distance=True)
    # The hyperparameters this meta-iteration trains with, per layer (thesis fig. 3.10).
    state.rows["layers"] += [{"meta_iteration": i, "layer": n, **s} for n, s in layer_summary(state.hypers).items()]
    row = {}
    for epoch in range(trainer.cfg.epochs):
        row = train_epoch(trainer, splits, epoch + 1, params.evaluation.batchnorm)
        state.rows["epochs"].append({"meta_iteration": i, **row})  # each training's epochs: epochs.csv, not a metric
        if not finite_losses(row):
            return False
    forward_seconds = time.perf_counter() - start

    problem = problem_for(trainer, splits, params.seed, w0)
    distances = torch.stack(trainer.distances).double().cpu()
    path = reverse_path(params, problem, trainer, distances)
    if not finite(flat(trainer.params), distances):
        return False
    grads = reverse(problem, path, state.hypers, HVP_METHODS[params.hvp])
    grad = grads["log10_l2"]
    if not finite(*grad.values()):
        return False
    trained_with = hyper_quantiles(state.hypers, "log10_l2")  # logged at step i: what meta-iteration i trained with
    sign_step(state.hypers, grad, state.momentum, cfg.hyper_step, cfg.hyper_momentum)

    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grad.values())).item()
    seconds = time.perf_counter() - start
    # this machine's HVP over gradient on this model, beside the declared `work.hvp_cost` (a few steps, once)
    grad_s, hvp_s = step_costs(problem, HVP_METHODS[params.hvp], sample=3) if i == 0 else (None, None)
    state.rows["meta"].append({"meta_iteration": i, "epochs": trainer.cfg.epochs, "steps": trainer.total_steps,
                          "reverse_steps": path.reverse_steps, "train_error": row["train_error"],
                          "val_error": row["val_error"], "test_error": row["test_error"],
                          "val_loss": grads["val_loss"], "hypergrad_norm": norm, "seconds": seconds,
                          "forward_seconds": forward_seconds, "reverse_seconds": seconds - forward_seconds,
                          "training_gradients": trainer.total_steps,
                          "hvp_cost_measured": round(hvp_s / grad_s, 3) if grad_s else None})
    if chosen_instead(state.chosen, trainer.cfg.epochs, row["val_error"]):
        state.chosen = {"meta_iteration": i, "epochs": trainer.cfg.epochs, "val_error": row["val_error"],
                      "l2_coefficients": {n: c.detach().cpu().clone() for n, c in coefs.items()}}
    _log_meta_iteration(tracker, state, i, trained_with)
    return True


def _log_meta_iteration(tracker: Tracker, state: DrmadState, i: int, trained_with: dict[str, float]) -> None:
    last = state.rows["meta"][-1]
    metrics = {f"meta/error/{s}": last[f"{s}_error"] for s in ("train", "val", "test")}
    metrics.update({"meta/hypergrad_norm": last["hypergrad_norm"], "meta/reverse_steps": last["reverse_steps"],
                    "meta/val_loss": last["val_loss"], "meta/seconds": last["seconds"]})
    tracker.log_metrics({**metrics, **trained_with}, step=i)
    values = torch.cat([state.hypers.log_value(n).reshape(-1).float().cpu() for n in state.hypers.shapes])
    tracker.log_figure(plots.histogram(values, f"log10 L2 after meta-iteration {i}", "log10 L2"),
                       f"histograms/log10_l2_meta{i:02d}.png")


def run(params: Params, prepared: Path, init: float, paths: DrmadOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None) -> dict:
    device = setup_device(params.device, params.threads)
    info, splits = load_prepared(prepared, device, tracker)
    cfg = params.drmad
    template = build_densenet(params.model, info, params.seed)
    state = DrmadState(HyperSpace.l2(template, init, cfg.sharing, bounds=tuple(cfg.bounds), device=device),
                cfg.start_epochs(init))

    checkpoint = Checkpoint(paths.checkpoint, fingerprint(init, params.seed, params.model.model_dump(),
                                                          cfg.model_dump(), info["digest"], DrmadState.FORMAT))
    if (saved := checkpoint.load(device)) is not None:
        state.restore(saved)

    def last() -> dict:
        row = state.rows["meta"][-1]
        return {"val": f"{row['val_error']:.3f}", "test": f"{row['test_error']:.3f}"}
    run_meta_iterations(state, cfg.meta_iterations, lambda: meta_iteration(params, state, splits, info, device, tracker),
                        checkpoint.save, f"drmad {init:g}", last, progress, tracker)

    metrics = summarise(state, init, params.report.last_n, params.work.hvp_cost, params.hvp)
    metrics["platform"] = machine.describe(device)  # bit-identity holds within one platform
    _write_outputs(paths, state, metrics, tracker)
    checkpoint.clear()
    return metrics


def summarise(state: DrmadState, init: float, last_n: int, hvp_cost: float, hvp: str = "double_backward") -> dict:
    """Rows are the completed meta-iterations (a diverging one records none)."""
    rows = state.rows["meta"]
    work = Work()
    for r in rows:
        work.train(r["training_gradients"])
        work.hypergradient(r["reverse_steps"], recomputed_gradients(hvp, r["reverse_steps"]))
    forward = sum(r["forward_seconds"] for r in rows)
    return {
        "init_log10_l2": init, "outcome": state.outcome, "meta_iterations_completed": len(rows),
        **final_errors(rows, state.outcome, last_n, "meta_iteration"),
        "reverse_steps": [r["reverse_steps"] for r in rows],
        "chosen_meta_iteration": state.chosen["meta_iteration"] if state.chosen else None,
        "seconds_per_meta_iteration": round(sum(r["seconds"] for r in rows) / len(rows), 3) if rows else None,
        "reverse_over_forward_time": round(sum(r["reverse_seconds"] for r in rows) / forward, 3) if rows else None,
        **work.metrics(hvp_cost), "hvp_cost": hvp_cost,
        "hvp_cost_measured": rows[0].get("hvp_cost_measured") if rows else None,
    }


def _write_outputs(paths: DrmadOutputs, state: DrmadState, metrics: dict, tracker: Tracker) -> None:
    io.save_torch(paths.hypers, {"values": {k: v.cpu() for k, v in state.hypers.values.items()},
                                 "sharing": state.hypers.sharing, "kind": state.hypers.kind, "chosen": state.chosen})
    for path, rows in ((paths.meta_csv, state.rows["meta"]), (paths.epochs_csv, state.rows["epochs"]),
                       (paths.layers_csv, state.rows["layers"])):
        with io.atomic_path(path) as tmp:
            pd.DataFrame(rows).to_csv(tmp, index=False)
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    for path in (paths.hypers, paths.metrics, paths.meta_csv, paths.epochs_csv, paths.layers_csv):
        tracker.log_artifact(path)
    if state.rows["meta"]:
        tracker.log_figure(plots.meta_curves(pd.DataFrame(state.rows["meta"]), "DrMAD meta-iterations"),
                           "drmad_errors.png")
