"""The baseline: seeded DenseNet training with fixed hyperparameters.

Outputs (all written atomically): the trained state, `metrics/baseline.json` and a per-epoch
CSV for `dvc plots`. A checkpoint after every epoch lets an interrupted run resume with
identical numbers; a non-finite loss ends the run as the outcome `diverged`, not a crash.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from pipeline import io, machine, plots
from pipeline.layout import BaselineOutputs
from pipeline.progress import Progress
from pipeline.checkpoint import Checkpoint, fingerprint
from pipeline.config import Params, TrainConfig
from pipeline.data import load_prepared
from pipeline.models import build_densenet
from pipeline.tracking import SILENT, Tracker
from pipeline.training import (Trainer, epoch_metrics, final_errors, finite_losses,
                               setup_device, train_epoch)
from pipeline.work import Work


def summarise(history: list[dict], cfg: TrainConfig, outcome: str, seconds: float, images: int,
              steps: int = 0) -> dict:
    """The numbers metrics/baseline.json reports (the thesis reports final and mean of last few)."""
    return {
        "outcome": outcome,
        "epochs_completed": len(history),
        **final_errors([h for h in history if finite_losses(h)], outcome, cfg.last_n, "epoch"),
        "last_n": cfg.last_n,
        "wall_time_s": round(seconds, 3),
        "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
        **_training_work(steps),
    }


def _training_work(steps: int) -> dict:
    work = Work()
    work.train(steps)
    return work.metrics(hvp_cost=1.0)  # no HVPs: the cost of one is irrelevant here


def run(params: Params, prepared: Path, paths: BaselineOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None) -> dict:
    device = setup_device(params.device, params.threads)
    info, splits = load_prepared(prepared, device, tracker)
    cfg = params.baseline
    checkpoint = Checkpoint(paths.checkpoint, fingerprint(params.seed, params.model.model_dump(),
                                                          cfg.model_dump(), info["digest"]))
    trainer, metrics = train(params, cfg, params.seed, splits, info, checkpoint, tracker=tracker,
                             progress=progress)
    metrics["platform"] = machine.describe(device)  # bit-identity holds within one platform
    _write_outputs(paths, trainer, trainer.state.history, metrics, info, tracker)
    checkpoint.clear()
    return metrics


def train(params: Params, cfg: TrainConfig, seed: int, splits: dict, info: dict, checkpoint: Checkpoint | None = None,
          l2_coefficients: dict | None = None, tracker: Tracker = SILENT, progress: bool | None = None,
          desc: str = "baseline") -> tuple[Trainer, dict]:
    """Train a fresh DenseNet of `params.model` (weights from `seed`) with `cfg`, evaluating
    after every epoch; resumes from `checkpoint` and saves it after each epoch. Returns the
    trainer (its state holds the per-epoch history) and the run's summary metrics."""
    device = splits["train"][0].device
    model = build_densenet(params.model, info, seed).to(device)
    trainer = Trainer(model, *splits["train"], cfg, seed, l2_coefficients)
    if checkpoint and (saved := checkpoint.load(device)) is not None:
        trainer.load_state_dict(saved)
    history, outcome = trainer.state.history, "finished"
    start = time.perf_counter() - sum(h["seconds"] for h in history)
    epochs = Progress(len(history), cfg.epochs, desc, "epoch", progress)
    for epoch in epochs:
        row = train_epoch(trainer, splits, epoch + 1, params.evaluation.batchnorm)
        history.append(row)
        epochs.report(val=f"{row['val_error']:.3f}", test=f"{row['test_error']:.3f}")
        tracker.log_metrics(epoch_metrics(row), step=row["epoch"])
        if not finite_losses(row):
            outcome = "diverged"
            break
        if checkpoint:
            checkpoint.save(trainer.state_dict())
    seconds = time.perf_counter() - start
    return trainer, summarise(history, cfg, outcome, seconds, len(history) * trainer.steps_per_epoch * cfg.batch_size,
                              trainer.state.step)


def _write_outputs(paths: BaselineOutputs, trainer: Trainer, history: list[dict], metrics: dict,
                   info: dict, tracker: Tracker) -> None:
    per_epoch = pd.DataFrame(history).drop(columns="seconds")
    io.save_torch(paths.model, {"model": trainer.model.state_dict(), "info": info})
    with io.atomic_path(paths.per_epoch) as tmp:
        per_epoch.to_csv(tmp, index=False)
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    tracker.log_figure(plots.error_curves(per_epoch, "baseline DenseNet"), "baseline_errors.png")
    tracker.log_artifact(paths.per_epoch)
    tracker.log_artifact(paths.metrics)
