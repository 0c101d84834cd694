"""Finalists: every method's chosen hyperparameters retrained from scratch at the baseline's full
schedule, once per seed of `final.seeds` (each seed its own initialisation, batch order and
dropout masks), and evaluated on the test split once, at the end.

One stage instance per kind of method:
    baseline   the hand-set hyperparameters of `baseline`
    search     each sampler's best trial (global log10 L2, and the step size for NAME-step),
               the search rerun per seed by tune@search: seed s retrains seed s's choice
    drmad      each initialisation's per-parameter log10 L2 from its chosen meta-iteration (the
               best validation among the longest trainings), rerun per seed by tune@drmad
    adaptive   each variant tunes while it trains: its own run at the baseline's epochs, step size
               and batch size (its hypergradient work is its tuning cost), twice: as the thesis ran
               it, with no schedule ("adaptive NAME"), and with the baseline's schedule under its
               learning rates ("adaptive NAME baseline-schedule", this project's variant)

Each finished (method, seed) is kept under checkpoints/final/KIND until the stage ends, and the
run in progress checkpoints every epoch: an interrupted stage redoes neither.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import inputs, io, machine
from pipeline.layout import AdaptiveOutputs, FinalOutputs, Outputs
from pipeline.checkpoint import Checkpoint, code_digest, fingerprint
from pipeline.config import FINAL_KINDS as KINDS, ConfigError, Params
from pipeline.data import load_prepared
from pipeline.experiments import adaptive, baseline, tune
from pipeline.tracking import SILENT, Tracker
from pipeline.models import build_densenet
from pipeline.training import setup_device, wrong_examples



@dataclass(frozen=True)
class Finalist:
    """A method's choice: the training settings and, for per-parameter L2, its coefficients."""
    method: str
    cfg: object = None  # TrainConfig; None: the adaptive variant named by `method`
    l2_coefficients: dict | None = None
    variant: str | None = None
    scheduled: bool = False  # adaptive: the baseline's schedule under the learned rates
    seed: int | None = None  # tuned per seed: the seed it was tuned at (and retrains at); None: every seed
    tuning_work: float = 0.0  # what choosing it cost (the adaptive's is inside its run)
    diverged: bool = False  # its tuning diverged before a first choice: nothing to retrain


def finalists(params: Params, kind: str, root: Path = Path(".")) -> list[Finalist]:
    """The kind's choices: one per method for all seeds, or (search, drmad: tuned per seed by
    tune@KIND) one per method and seed."""
    if kind == "baseline":
        return [Finalist("baseline", params.baseline)]
    if kind == "adaptive":
        return [Finalist(f"adaptive {name}{' baseline-schedule' if scheduled else ''}", variant=name, scheduled=scheduled)
                for name in params.adaptive.variants for scheduled in (False, True)]
    if kind not in tune.TUNED_KINDS:
        raise ConfigError(f"--kind: one of {', '.join(KINDS)} (got {kind!r})")
    path = Outputs(root).tune(kind).choices
    choices = inputs.read_torch(path)
    needs = ("outcome", "tuning_work") + (("log10_l2", "alpha") if kind == "search" else ("l2_coefficients",))
    out = []
    for method in tune.methods(params, kind):
        for seed in params.final.seeds:
            c = choices.get(method, {}).get(f"seed{seed}")
            if not isinstance(c, dict) or not set(needs) <= set(c):
                raise inputs.InputError(f"{path}: lacks {method} at seed {seed}; it is written by tune@{kind}: "
                                        f"run `dvc repro tune@{kind}`")
            cfg = params.baseline if kind == "drmad" else params.baseline.model_copy(
                update={"log10_l2": c["log10_l2"], "alpha": c["alpha"]})
            out.append(Finalist(method, cfg, c["l2_coefficients"], seed=seed, tuning_work=c["tuning_work"],
                                diverged=c["outcome"] == "diverged"))
    return out


def adaptive_params(params: Params, seed: int, scheduled: bool) -> Params:
    """The adaptive method at the baseline's epochs, step size, batch and initial L2; with
    `scheduled`, the baseline's schedule too (else none: the thesis')."""
    b = params.baseline
    schedule = b.schedule if scheduled else b.schedule.model_copy(update={"milestones": []})
    return params.model_copy(update={"seed": seed, "adaptive": params.adaptive.model_copy(update={
        "epochs": b.epochs, "schedule": schedule, "alpha": b.alpha, "batch_size": b.batch_size,
        "init_log10_l2": b.log10_l2, "eval_batch_size": b.eval_batch_size})})


def run(params: Params, prepared: Path, kind: str, paths: FinalOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None, root: Path = Path(".")) -> dict:
    device = setup_device(params.device, params.threads)
    info, splits = load_prepared(prepared, device, tracker)
    results = []
    for finalist in finalists(params, kind, root):
        for seed in params.final.seeds if finalist.seed is None else [finalist.seed]:
            result = _finished_or_run(params, finalist, seed, prepared, splits, info, paths, progress)
            results.append(result)
            tracker.log_metrics({f"{finalist.method}/test_error/seed{seed}": result["test_error"]})
    metrics = summarise(results, params.final.seeds, len(splits["test"][1]))
    metrics["platform"] = machine.describe(device)  # bit-identity holds within one platform
    _write_outputs(paths, results, metrics, tracker)
    shutil.rmtree(paths.work_dir, ignore_errors=True)
    return metrics


def _finished_or_run(params: Params, finalist: Finalist, seed: int, prepared: Path, splits: dict, info: dict,
                     paths: FinalOutputs, progress: bool | None) -> dict:
    key = fingerprint(code_digest(), finalist.method, seed, params.model.model_dump(), params.evaluation.model_dump(),
                      finalist.cfg.model_dump() if finalist.cfg else adaptive_params(params, seed, finalist.scheduled).adaptive.model_dump(),
                      _digest(finalist.l2_coefficients), finalist.tuning_work, finalist.diverged, info["digest"])
    stem = f"{finalist.method.replace(' ', '_')}-seed{seed}"
    done = paths.work_dir / f"{stem}.json"
    if (saved := _record(done)) is not None and saved.get("key") == key:
        return saved["result"]
    print(f"final: {finalist.method}, seed {seed}", file=sys.stderr, flush=True)
    if finalist.diverged:
        result = {"method": finalist.method, "seed": seed, "outcome": "diverged", "test_error": None, "val_error": None,
                  "train_error": None, "training_work": 0, "tuning_work": finalist.tuning_work, "wall_time_s": 0.0,
                  "tuning_wall_s": None, "test_wrong": None, "epochs": []}
        io.write_json(done, {"key": key, "result": result})
        return result
    if finalist.variant is None:
        checkpoint = Checkpoint(paths.work_dir / f"{stem}.pt", key)
        trainer, m = baseline.train(params, finalist.cfg, seed, splits, info, checkpoint, finalist.l2_coefficients,
                                    progress=progress, desc=f"{finalist.method} seed {seed}")
        history, tuning = trainer.state.history, finalist.tuning_work
        tuning_wall = None if finalist.seed is not None else 0.0  # a tuned one's: tune@KIND's timings
        model = trainer.model
        checkpoint.clear()
    else:
        where = paths.work_dir / stem
        m = adaptive.run(adaptive_params(params, seed, finalist.scheduled), prepared, finalist.variant, AdaptiveOutputs(
            where / "hypers.pt", where / "metrics.json", where / "epochs.csv", where / "layers.csv", where / "checkpoint.pt",
            where / "model.pt"), progress=progress)
        model = build_densenet(params.model, info, seed).to(splits["test"][0].device)
        model.load_state_dict(torch.load(where / "model.pt", weights_only=True))
        history = pd.read_csv(where / "epochs.csv").to_dict("records")
        tuning = m["work_gradient_equivalents"] - m["work_training_gradients"]
        tuning_wall = m["hypergradient_time_share"] * m["wall_time_s"] if m["hypergradient_time_share"] else 0.0
    result = {"method": finalist.method, "seed": seed, "outcome": m["outcome"],
              "test_error": m["final_test_error"], "val_error": m["final_val_error"],
              "train_error": m["final_train_error"], "training_work": m["work_training_gradients"],
              "tuning_work": tuning, "wall_time_s": m["wall_time_s"], "tuning_wall_s": None if tuning_wall is None else round(tuning_wall, 3),
              "test_wrong": None if m["outcome"] == "diverged" else wrong_examples(
                  model, *splits["test"], params.baseline.eval_batch_size),
              "epochs": [{k: r[k] for k in ("epoch", "train_error", "val_error", "test_error")} for r in history]}
    wrong, n = result["test_wrong"], len(splits["test"][1])
    if wrong is not None and len(wrong) != round(result["test_error"] * n):  # the two evaluations must agree
        raise RuntimeError(f"{finalist.method} seed {seed}: {len(wrong)} wrong test images, but test error "
                           f"{result['test_error']} of {n}")
    io.write_json(done, {"key": key, "result": result})
    return result


def _record(path: Path) -> dict | None:
    """A finished seed's record, or None when there is none or it is unreadable (a truncated record
    is a seed to run again, not a fault: the records are this stage's own cache)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and isinstance(saved.get("result"), dict) else None


def _digest(tensors: dict | None) -> str | None:
    if tensors is None:
        return None
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode() + b"\0" + tensors[name].cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def summarise(results: list[dict], seeds: list[int], test_size: int) -> dict:
    """Per method and seed: test error (null when that run diverged), the wrong test images'
    indices (paired comparisons need which, not only how many), work and wall time."""
    out: dict = {"seeds": seeds, "test_size": test_size, "methods": {}}
    for r in results:
        entry = out["methods"].setdefault(r["method"], {"test_error": {}, "outcome": {}, "training_work": {}, "tuning_work": {},
                                             "wall_time_s": {}, "tuning_wall_s": {}, "test_wrong": {}})
        for key in ("test_error", "outcome", "training_work", "tuning_work", "wall_time_s", "tuning_wall_s",
                    "test_wrong"):
            entry[key][f"seed{r['seed']}"] = r[key]
    return out


def _write_outputs(paths: FinalOutputs, results: list[dict], metrics: dict, tracker: Tracker) -> None:
    rows = [{"method": r["method"], "seed": r["seed"], **e} for r in results for e in r["epochs"]]
    with io.atomic_path(paths.epochs_csv) as tmp:
        pd.DataFrame(rows, columns=["method", "seed", "epoch", "train_error", "val_error", "test_error"]).to_csv(
            tmp, index=False)
    io.write_metrics(paths.metrics, metrics)
    tracker.log_artifact(paths.metrics)
    tracker.log_artifact(paths.epochs_csv)
