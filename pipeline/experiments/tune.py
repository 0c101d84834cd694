"""The `tune` stage: each tuned method's tuning rerun once per seed of `final.seeds`.

Tuning is part of the method (Bouthillier et al., 2021): the unit the verdict replicates is tune +
retrain. For seed s, every sampler of `search.samplers` runs its study again (sampler stream and
trial trainings of seed s) and every init of `drmad.inits` its meta-iterations (w_0, batches and
dropout masks of seed s); `final@KIND` then retrains each seed's choice at that seed. The stages
search@NAME and drmad@INIT stay the one-seed showcase (figures, MLflow) at `seed`.

The searches spend the budget the search stages spent (a number, read once: every seed runs the
same number of trials). Runs in one process, as the search stages do (a study's storage is one
writer's here); the retraining in `final` is what data-parallel ranks share. Each finished (method, seed) is kept under
checkpoints/tune/KIND until the stage ends; an interrupted tuning resumes (Optuna storage, DrMAD
checkpoint).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

from pipeline import inputs, io
from pipeline.layout import Outputs, TuneOutputs
from pipeline.checkpoint import code_digest, fingerprint
from pipeline.config import TUNED_KINDS, ConfigError, Params
from pipeline.data import load_info
from pipeline.experiments import drmad, search
from pipeline.tracking import SILENT, Tracker


def methods(params: Params, kind: str) -> list[str]:
    if kind == "search":
        return list(params.search.samplers)
    if kind == "drmad":
        return [f"drmad {i:g}" for i in params.drmad.inits]
    raise ConfigError(f"--kind: one of {', '.join(TUNED_KINDS)} (got {kind!r})")


def seeded(params: Params, kind: str, seed: int, root: Path) -> Params:
    """The params one seed's tuning runs: that seed; a search's budget as the number it was, in
    a storage of its own."""
    out = params.model_copy(update={"seed": seed})
    if kind == "search":
        out = out.model_copy(update={"search": params.search.model_copy(update={
            "budget": search.budget(params, root), "storage": None})})
    return out


def tune_one(params: Params, prepared: Path, kind: str, method: str, where: Path, progress: bool | None = None) -> dict:
    """One method's tuning at `params.seed`: its choice, counted work and wall seconds."""
    if kind == "search":
        m = search.run(params, prepared, method, Outputs(where).search(method), progress=progress)
        return {"outcome": "finished", "log10_l2": m["best_log10_l2"], "alpha": 10.0 ** m["best_log10_alpha"],
                "trials": m["trials"], "best_trial": m["best_trial"], "l2_coefficients": None,
                "tuning_work": m["work_gradient_equivalents"], "tuning_wall_s": m["wall_time_s"]}
    init = float(method.removeprefix("drmad "))
    paths = Outputs(where).drmad(f"{init:g}")
    m = drmad.run(params, prepared, init, paths, progress=progress)
    chosen = torch.load(paths.hypers, weights_only=True)["chosen"]
    wall = (m["seconds_per_meta_iteration"] or 0.0) * m["meta_iterations_completed"]
    out = {"outcome": "finished" if chosen else "diverged", "tuning_work": m["work_gradient_equivalents"],
           "tuning_wall_s": round(wall, 3), "meta_iteration": None, "mean_log10_l2": None, "l2_coefficients": None}
    if chosen:  # None: the first meta-iteration diverged, nothing to retrain
        logs = torch.cat([torch.log10(c / 2).flatten() for c in chosen["l2_coefficients"].values()])
        out.update(meta_iteration=chosen["meta_iteration"], mean_log10_l2=logs.mean().item(),
                   l2_coefficients=chosen["l2_coefficients"])
    return out


def run(params: Params, prepared: Path, kind: str, paths: TuneOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None, root: Path = Path(".")) -> dict:
    digest = load_info(prepared)["digest"]
    choices: dict = {}
    for seed in params.final.seeds:
        p = seeded(params, kind, seed, root)
        for method in methods(params, kind):
            key = fingerprint(code_digest(), kind, method, seed, p.model.model_dump(), p.baseline.model_dump(),
                              getattr(p, kind).model_dump(), p.hvp, p.work.model_dump(), digest)
            record = paths.work_dir / f"{method.replace(' ', '_')}-seed{seed}.pt"
            saved = _record(record)
            if saved is None or saved["key"] != key:
                print(f"tune: {method}, seed {seed}", file=sys.stderr, flush=True)
                where = paths.work_dir / f"{method.replace(' ', '_')}-seed{seed}"
                io.save_torch(record, {"key": key, "choice": tune_one(p, prepared, kind, method, where, progress)})
                shutil.rmtree(where, ignore_errors=True)
                saved = _record(record)
            choices.setdefault(method, {})[f"seed{seed}"] = saved["choice"]
            tracker.log_metrics({f"{method}/tuning_work/seed{seed}": saved["choice"]["tuning_work"]})
    metrics = summarise(choices, params.final.seeds)
    io.save_torch(paths.choices, io.split_timings(choices)[0])  # results only: final retrains them
    io.write_metrics(paths.metrics, metrics)
    tracker.log_artifact(paths.metrics)
    shutil.rmtree(paths.work_dir, ignore_errors=True)
    return metrics


def summarise(choices: dict, seeds: list[int]) -> dict:
    """Per method and seed: what it chose (no tensors) and the work it spent."""
    return {"seeds": seeds, "methods": {method: {seed: {k: v for k, v in c.items() if k != "l2_coefficients"}
                                                 for seed, c in by_seed.items()} for method, by_seed in choices.items()}}


def _record(path: Path) -> dict | None:
    """A finished tuning's record, or None when there is none or it is unreadable (a truncated
    record is a tuning to run again, not a fault: the records are this stage's own cache)."""
    try:
        return inputs.read_torch(path, ("key", "choice"))
    except inputs.InputError:
        return None
