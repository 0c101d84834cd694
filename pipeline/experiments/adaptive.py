"""The `adaptive` stage: one training run whose per-parameter L2 and learning rates follow
online hypergradients (algorithms §7, thesis 3.2.2), for one configuration of `adaptive.variants`.

A checkpoint after every epoch (weights, velocity, hyperparameters, the stored window, step)
lets a killed run resume with identical numbers: batches and masks are functions of the step.
A non-finite loss or hypergradient ends the run as the outcome `diverged`, not a crash.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline import io, machine, plots
from pipeline.layout import AdaptiveOutputs
from pipeline.adaptive import AdaptiveSettings, AdaptiveTrainer
from pipeline.data import load_prepared
from pipeline.models import build_densenet
from pipeline.tracking import SILENT, Tracker
from pipeline.progress import Progress
from pipeline.checkpoint import Checkpoint, fingerprint
from pipeline.config import AdaptiveVariant, ConfigError, Params
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.hvp import recomputed_gradients
from pipeline.experiments.summaries import hyper_quantiles
from pipeline.work import Work
from pipeline.meta import layer_summary
from pipeline.seeds import INIT_STREAM, derive_seed
from pipeline.training import (epoch_metrics, setup_device, final_errors, finite_losses, step_sizes,
                               train_epoch)

LOG10_E = 1 / math.log(10)


def variant(params: Params, name: str, info: dict | None = None) -> AdaptiveVariant:
    """The configuration `name`; with the prepared data's info, its val_size is checked too."""
    if name not in params.adaptive.variants:
        raise ConfigError(f"--variant: one of {', '.join(params.adaptive.variants)} (got {name!r})")
    var = params.adaptive.variants[name]
    pool = info["sizes"]["train"] + info["sizes"]["val"] if info else None
    if pool and var.val_size is not None and not var.val_size < pool:
        raise ConfigError(f"adaptive.variants.{name}.val_size: below the {pool} train+val images (got {var.val_size})")
    return var


def resplit(splits: dict, val_size: int | None, seed: int) -> dict:
    """Hold out `val_size` of train+val for validation (thesis: 40k/10k, 36k/14k), seeded."""
    if val_size is None:
        return splits
    x = torch.cat([splits["train"][0], splits["val"][0]])
    y = torch.cat([splits["train"][1], splits["val"][1]])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(derive_seed(seed, INIT_STREAM, 1)))
    order = order.to(x.device)
    return {**splits, "val": (x[order[:val_size]], y[order[:val_size]]),
            "train": (x[order[val_size:]], y[order[val_size:]])}


def hyperspaces(params: Params, model, momentum: float) -> tuple[HyperSpace, HyperSpace]:
    cfg = params.adaptive
    shapes = {n: p.shape for n, p in model.named_parameters()}
    device = next(model.parameters()).device
    l2 = HyperSpace.l2(model, cfg.init_log10_l2, cfg.sharing, bounds=tuple(cfg.l2_bounds), device=device)
    low = math.log(cfg.floor_factor) if cfg.lr_floor and cfg.floor_schedule is None else -math.inf
    lr = HyperSpace.create(shapes, "log_lr", cfg.init_log_lr, cfg.lr_sharing, base=math.e,
                           bounds=(low, cfg.eta_max(momentum)), select=lambda name: True, device=device)
    return l2, lr


def eta_floor(cfg, momentum: float, total_steps: int | None = None):
    """With a floor schedule of its own: step -> the least eta keeping alpha_t e^eta >= floor_factor *
    alpha * floor_schedule_t (thesis 3.2.2's proposal: no rate below the baseline schedule's);
    None otherwise (the floor is then the static bound log(floor_factor) relative to `schedule`)."""
    if not (cfg.lr_floor and cfg.floor_schedule is not None):
        return None
    train = cfg.train_config(momentum)
    floor_train = train.model_copy(update={"schedule": cfg.floor_schedule})

    def floor(step: int, steps: int) -> float:
        return math.log(cfg.floor_factor * step_sizes(floor_train, steps)(step) / step_sizes(train, steps)(step))
    return floor


def run(params: Params, prepared: Path, name: str, paths: AdaptiveOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None) -> dict:
    device = setup_device(params.device, params.threads)
    info, splits = load_prepared(prepared, device, tracker)
    cfg, var = params.adaptive, variant(params, name, info)
    splits = resplit(splits, var.val_size, params.seed)
    model = build_densenet(params.model, info, params.seed).to(device)
    l2, lr = hyperspaces(params, model, var.momentum)
    val_batch = cfg.val_batch_size * (var.window if cfg.val_batches == "window" else 1)  # M batches: one of M x b
    settings = AdaptiveSettings(var.every, var.window, var.l2_step, var.lr_step, val_batch, params.hvp,
                                eta_floor(cfg, var.momentum))
    trainer = AdaptiveTrainer(model, *splits["train"], *splits["val"], cfg.train_config(var.momentum),
                              params.seed, l2, lr, settings)

    checkpoint = Checkpoint(paths.checkpoint, fingerprint(name, params.seed, params.model.model_dump(),
                                                          cfg.model_dump(), info["digest"]))
    layer_rows: list[dict] = []
    if (saved := checkpoint.load(device)) is not None:
        trainer.load_state_dict(saved["trainer"])
        for space, values in ((l2, saved["l2"]), (lr, saved["lr"])):
            for key, value in values.items():
                space.values[key].copy_(value)
        trainer.recent.extend(saved["recent"])
        trainer.updates, trainer.hyper_seconds, layer_rows = saved["updates"], saved["hyper_seconds"], saved["layers"]
        trainer.hypergradients_taken = saved["hypergradients_taken"]
        trainer.refresh()
    history, outcome = trainer.state.history, "finished"
    start = time.perf_counter() - sum(h["seconds"] for h in history)
    bar = Progress(len(history), cfg.epochs, f"adaptive {name}", "epoch", progress)
    for epoch in bar:
        row = train_epoch(trainer, splits, epoch + 1, params.evaluation.batchnorm)
        row["val_test_gap"] = row["test_error"] - row["val_error"]
        history.append(row)
        layer_rows += _layer_rows(epoch + 1, l2, lr)
        bar.report(val=f"{row['val_error']:.3f}", test=f"{row['test_error']:.3f}")
        _log_epoch(tracker, row, layer_rows, l2, lr)
        if not finite_losses(row) or not trainer.finite:
            outcome = "diverged"
            break
        checkpoint.save({"trainer": trainer.state_dict(), "l2": l2.values, "lr": lr.values,
                         "recent": list(trainer.recent), "updates": trainer.updates,
                         "hyper_seconds": trainer.hyper_seconds, "layers": layer_rows,
                         "hypergradients_taken": trainer.hypergradients_taken})

    seconds = time.perf_counter() - start
    metrics = summarise(history, cfg.last_n, outcome, seconds, trainer, name, params.work.hvp_cost)
    if paths.model:
        io.save_torch(paths.model, model.state_dict())
    metrics["platform"] = machine.describe(device)  # bit-identity holds within one platform
    _write_outputs(paths, history, layer_rows, metrics, l2, lr, tracker)
    checkpoint.clear()
    return metrics


def _layer_rows(epoch: int, l2: HyperSpace, lr: HyperSpace) -> list[dict]:
    """Per layer: mean/std of log10 L2 and of log10 learning-rate multiplier (thesis figs 3.16-3.17)."""
    rows = [{"epoch": epoch, "kind": "log10_l2", "layer": n, **s} for n, s in layer_summary(l2).items()]
    rows += [{"epoch": epoch, "kind": "log10_lr", "layer": n, "mean": s["mean"] * LOG10_E, "std": s["std"] * LOG10_E}
             for n, s in layer_summary(lr).items()]
    return rows


def _log_epoch(tracker: Tracker, row: dict, layer_rows: list[dict], l2: HyperSpace, lr: HyperSpace) -> None:
    metrics = {**epoch_metrics(row), "gap/test_minus_val": row["val_test_gap"]}
    metrics.update({**hyper_quantiles(l2, "log10_l2"), **hyper_quantiles(lr, "log10_lr", LOG10_E)})
    tracker.log_metrics(metrics, step=row["epoch"])  # per-layer detail: layers.csv
    for space, kind, scale in ((l2, "log10_l2", 1.0), (lr, "log10_lr", LOG10_E)):
        values = torch.cat([space.log_value(n).reshape(-1).float().cpu() for n in space.shapes]) * scale
        tracker.log_figure(plots.histogram(values, f"{kind} after epoch {row['epoch']}", kind),
                           f"histograms/{kind}_epoch{row['epoch']:03d}.png")


def counted_work(trainer: AdaptiveTrainer) -> Work:
    """Every training step, and each hypergradient through the last `window` steps."""
    work = Work()
    work.train(trainer.state.step)
    for _ in range(trainer.hypergradients_taken):
        work.hypergradient(trainer.settings.window, recomputed_gradients(trainer.settings.hvp, trainer.settings.window))
    return work


def summarise(history: list[dict], last_n: int, outcome: str, seconds: float, trainer: AdaptiveTrainer,
              name: str, hvp_cost: float) -> dict:
    finite = [h for h in history if finite_losses(h)]
    return {
        "variant": name, "outcome": outcome, "epochs_completed": len(history),
        **final_errors(finite, outcome, last_n, "epoch"),
        "last_n": last_n,
        "final_val_test_gap": finite[-1]["val_test_gap"] if finite and outcome != "diverged" else None,
        "hyper_updates": trainer.updates,
        "wall_time_s": round(seconds, 3),
        "hypergradient_time_share": round(trainer.hyper_seconds / seconds, 4) if seconds > 0 else None,
        **counted_work(trainer).metrics(hvp_cost),
    }


def _write_outputs(paths: AdaptiveOutputs, history: list[dict], layer_rows: list[dict], metrics: dict,
                   l2: HyperSpace, lr: HyperSpace, tracker: Tracker) -> None:
    io.save_torch(paths.hypers, {"log10_l2": {k: v.cpu() for k, v in l2.values.items()},
                                 "log_lr": {k: v.cpu() for k, v in lr.values.items()}, "sharing": l2.sharing})
    per_epoch = pd.DataFrame(history).drop(columns="seconds")
    for path, frame in ((paths.epochs_csv, per_epoch), (paths.layers_csv, pd.DataFrame(layer_rows))):
        with io.atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    for path in (paths.hypers, paths.metrics, paths.epochs_csv, paths.layers_csv):
        tracker.log_artifact(path)
    if history:
        tracker.log_figure(plots.error_curves(per_epoch, "adaptive DenseNet"), "adaptive_errors.png")
