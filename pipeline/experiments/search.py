"""The peers: random search and TPE (Optuna) over the baseline's global log10 L2 (DrMAD's space:
`random`, `tpe`), or over it and the log10 step size (`random-step`, `tpe-step`).

Each trial trains a fresh DenseNet for `search.trial_epochs` epochs with the baseline's settings
otherwise (its schedule compressed into those epochs) and reports the validation error. The
search spends the budget in counted work (gradient evaluations, as DrMAD's is counted):
floor(budget / trial cost) trials, so two searches given one budget spend it to within a trial.

The study lives in Optuna's RDB storage: a killed search resumes with its finished trials kept
(a trial the dead attempt left running is marked failed and redone). Each trial's sampler is
seeded from (seed, number of finished trials), so a resumed search draws what an uninterrupted
one would have drawn. Trials run through `Study.optimize`, the one Optuna interface with
heartbeats: a trial whose worker stopped beating (killed, on any machine) for twice
`search.heartbeat_s` is failed and its place taken by another trial.
"""
from __future__ import annotations

import math
import os
import socket
import zlib
import sys
import time
import warnings
from pathlib import Path

import optuna
import pandas as pd
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from pipeline import inputs, io, machine
from pipeline.layout import Outputs, SearchOutputs
from pipeline.checkpoint import code_digest, fingerprint
from pipeline.config import ConfigError, Params, TrainConfig
from pipeline.data import load_prepared
from pipeline.experiments.baseline import train
from pipeline.seeds import derive_seed
from pipeline.tracking import SILENT, Tracker
from pipeline.training import setup_device

SEARCH_STREAM = 4  # seeds of the samplers (pipeline/seeds.py holds streams 1-3)
STEP = "-step"  # a search of the step size as well
DIVERGED_ERROR = 1.0  # the objective of a trial whose loss became non-finite: worse than any result


def sampler(name: str, params: Params, finished: int, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded from (seed, finished trials): a resumed search draws what an uninterrupted one drew.
    Helper workers (`worker` > 0) add their own stream, or two would draw the same point."""
    seed = derive_seed(params.seed, SEARCH_STREAM + worker, finished) % 2 ** 32  # Optuna seeds numpy: 32 bits
    if name.removesuffix(STEP) == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=params.search.tpe_startup_trials)


def distributions(params: Params, name: str) -> dict[str, FloatDistribution]:
    """DrMAD's space (the global log10 L2), and the log10 step size for the `-step` searches."""
    space = params.search.space
    out = {"log10_l2": FloatDistribution(*space.log10_l2)}
    if name.endswith(STEP):
        out["log10_alpha"] = FloatDistribution(*space.log10_alpha)
    return out


def log10_alpha(params: Params, values: dict[str, float]) -> float:
    """The trial's log10 step size: searched, or the baseline's."""
    return values.get("log10_alpha", math.log10(params.baseline.alpha))


def trial_config(params: Params, values: dict[str, float]) -> TrainConfig:
    return params.baseline.model_copy(update={"epochs": params.search.trial_epochs, "log10_l2": values["log10_l2"],
                                              "alpha": 10.0 ** log10_alpha(params, values)})


def trial_cost(params: Params, info: dict) -> int:
    """Gradient evaluations of one full trial (a diverging one stops early and costs less)."""
    return params.search.trial_epochs * (info["sizes"]["train"] // params.baseline.batch_size)


def budget(params: Params, root: Path = Path(".")) -> float:
    """The gradient evaluations to spend: a number, or the mean counted work of the drmad@INIT runs."""
    if params.search.budget != "drmad":
        return float(params.search.budget)
    found = {float(t): Outputs(root).drmad(t).metrics for t in Outputs(root).instances("drmad")}  # named as written: -4 or -4.0
    if missing := [i for i in params.drmad.inits if i not in found]:
        raise ConfigError(f"search.budget: drmad, but metrics/drmad has no result for init(s) {missing}; run "
                          "`dvc repro drmad` first or give a number of gradient evaluations")
    spent = [inputs.read_json(found[i], ("work_gradient_equivalents",))["work_gradient_equivalents"]
             for i in params.drmad.inits]
    return sum(spent) / len(spent)


def open_study(name: str, params: Params, info: dict, paths: SearchOutputs, total: float) -> optuna.Study:
    """The study of these settings (a changed setting starts a new one), trials a dead attempt
    left running marked failed. Keyed by the budget's value `total`, not its name (`drmad` is
    whatever the drmad runs spent): a changed budget is a new study."""
    key = fingerprint(code_digest(), name, params.seed, params.model.model_dump(), params.baseline.model_dump(),
                      params.search.model_dump(exclude={"storage", "heartbeat_s"}), params.evaluation.model_dump(),
                      info["digest"], repr(float(total)))
    url = params.search.storage
    if url is None:
        paths.storage_dir.mkdir(parents=True, exist_ok=True)
        file = paths.storage_dir / f"{name}.db"
        if file.is_file() and file.stat().st_size and _header(file) != b"SQLite format 3\x00":
            raise ConfigError(f"{file}: not an SQLite database (a damaged study of search@{name}); delete it to "
                              "start the search afresh")
        url = f"sqlite:///{file.resolve()}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for attempt in range(5):  # workers starting together race to create the schema and the study
        try:
            with warnings.catch_warnings():  # Optuna calls heartbeats experimental since 2.5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, heartbeat_interval=params.search.heartbeat_s)
            study = optuna.create_study(study_name=f"{name}-{key[:16]}", storage=storage, direction="minimize",
                                        load_if_exists=True)
            break
        except (SQLAlchemyError, optuna.exceptions.OptunaError) as exc:
            if attempt == 4:
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise ConfigError(f"search@{name}: its Optuna storage cannot be opened ({reason}); a file under "
                                  f"{paths.storage_dir} may be damaged: delete it to start afresh") from None
            time.sleep(1.0 + attempt)
    for trial in study.get_trials(states=(TrialState.RUNNING,)):
        unclaimed = "worker" not in trial.user_attrs and time.time() - trial.datetime_start.timestamp() > CLAIM_S
        if unclaimed or _dead(trial.user_attrs.get("worker")):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # its worker finished it meanwhile
    return study


def _header(file: Path) -> bytes:
    with open(file, "rb") as f:
        return f.read(16)


WORKER = f"{socket.gethostname()}:{os.getpid()}"


CLAIM_S = 60.0  # a worker names itself on a trial right after asking for it; one unnamed longer died


def _dead(worker: str | None) -> bool:
    """A trial left RUNNING by a process of this machine that is gone (or by this very process,
    which runs no trial while it opens the study). Another machine's trial is left alone: its
    worker may still be training it."""
    if worker is None:
        return False
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def live(study: optuna.Study) -> list[int]:
    """Numbers of the trials that count against the plan: finished or being trained."""
    return sorted(t.number for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.RUNNING)))


def run(params: Params, prepared: Path, name: str, paths: SearchOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None, root: Path = Path("."), worker_only: bool = False) -> dict | None:
    """Run trials until the study holds floor(budget / trial cost) of them, then (unless
    `worker_only`: a helper process on a shared study) wait for other workers' trials and
    write the outputs. Several processes on one study share that plan: the earliest trials win
    the last places, a surplus one is marked failed unrun."""
    device = setup_device(params.device, params.threads)
    info, splits = load_prepared(prepared, device, tracker)
    total, cost = budget(params, root), trial_cost(params, info)
    if cost > total:
        raise ConfigError(f"search.trial_epochs: one trial costs {cost} gradient evaluations, more than the "
                          f"budget of {total:g}; shorten the trials or raise search.budget")
    study, planned = open_study(name, params, info, paths, total), int(total // cost)
    start = time.perf_counter()

    plan_full = False

    def objective(trial: optuna.Trial) -> float:
        nonlocal plan_full
        values = {key: trial.suggest_float(key, d.low, d.high) for key, d in distributions(params, name).items()}
        trial.set_user_attr("worker", WORKER)
        if trial.number not in live(study)[:planned]:  # another worker took the last place meanwhile
            plan_full = True
            raise optuna.TrialPruned("surplus")
        value, attrs = _trial(params, splits, info, values, trial.number, tracker, progress)
        for key, attr in attrs.items():
            trial.set_user_attr(key, attr)
        return value

    while True:
        while len(live(study)) < planned and not plan_full:
            finished = len(study.get_trials(states=(TrialState.COMPLETE,)))
            study.sampler = sampler(name, params, finished, zlib.crc32(WORKER.encode()) + 1 if worker_only else 0)
            study.optimize(objective, n_trials=1)
        plan_full = False
        if worker_only or not study.get_trials(states=(TrialState.RUNNING,)):
            break
        time.sleep(2.0)  # other workers' last trials; one whose worker died is failed, and its place redone
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    if worker_only:
        return None
    trials = trials_table(study, planned, math.log10(params.baseline.alpha))
    metrics = summarise(trials, name, total, cost, time.perf_counter() - start)
    metrics["platform"] = machine.describe(device)  # bit-identity holds within one platform
    _write_outputs(paths, trials, metrics, tracker)
    return metrics


def _trial(params: Params, splits: dict, info: dict, values: dict, number: int, tracker: Tracker,
           progress: bool | None) -> tuple[float, dict]:
    """Train one trial (a nested MLflow run when tracked); (objective, user attributes)."""
    cfg = trial_config(params, values)

    with tracker.child(f"trial {number}", {"trial": number, **values, "alpha": cfg.alpha}) as child:
        trainer, m = train(params, cfg, params.seed, splits, info, tracker=child, progress=progress,
                           desc=f"trial {number}")
        diverged = m["outcome"] == "diverged"
        value = DIVERGED_ERROR if diverged else m["final_val_error"]
        attrs = {"work": m["work_gradient_equivalents"], "outcome": m["outcome"], "seconds": m["wall_time_s"],
                 "test_error": m["final_test_error"]}
        child.log_metrics({"objective/val_error": value, "work_gradient_equivalents": attrs["work"],
                           "wall_time_s": attrs["seconds"]})
        print(f"trial {number}: log10 L2 {values['log10_l2']:.3f}, alpha {cfg.alpha:.4g} -> val error "
              f"{value:.4f} ({m['outcome']})", file=sys.stderr, flush=True)
        return value, attrs


def trials_table(study: optuna.Study, planned: int, fixed_log10_alpha: float) -> pd.DataFrame:
    """The first `planned` finished trials in the order they were asked for, numbered 0, 1, ... as
    finished trials (Optuna's numbers count failed and surplus ones too: a killed attempt would
    renumber the rest). A trial past the plan (a racing worker's) is never reported: no search
    reports more work than its budget."""
    done = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.number)[:planned]
    rows = [{"trial": i, "log10_l2": t.params["log10_l2"], "log10_alpha": t.params.get("log10_alpha", fixed_log10_alpha),
             "val_error": t.value, "test_error": t.user_attrs["test_error"], "outcome": t.user_attrs["outcome"],
             "work_gradient_equivalents": t.user_attrs["work"], "wall_time_s": t.user_attrs["seconds"]}
            for i, t in enumerate(done)]
    frame = pd.DataFrame(rows, columns=["trial", "log10_l2", "log10_alpha", "val_error", "test_error", "outcome",
                                        "work_gradient_equivalents", "wall_time_s"])
    frame["best_val_error_so_far"] = frame["val_error"].cummin()
    return frame


def summarise(trials: pd.DataFrame, name: str, total: float, cost: int, seconds: float) -> dict:
    """The chosen trial: the lowest validation error, the earliest among equals."""
    best = trials.sort_values(["val_error", "trial"]).iloc[0]
    return {"sampler": name, "trials": len(trials), "budget_gradient_equivalents": total,
            "trial_gradient_equivalents": cost, "work_gradient_equivalents": float(trials["work_gradient_equivalents"].sum()),
            "best_trial": int(best["trial"]), "best_val_error": float(best["val_error"]),
            "best_log10_l2": float(best["log10_l2"]), "best_log10_alpha": float(best["log10_alpha"]),
            "diverged_trials": int((trials["outcome"] == "diverged").sum()),
            "wall_time_s": round(float(trials["wall_time_s"].sum()), 3), "attempt_wall_time_s": round(seconds, 3)}


def chosen(metrics: dict) -> dict[str, float]:
    return {"log10_l2": metrics["best_log10_l2"], "alpha": 10.0 ** metrics["best_log10_alpha"]}


def _write_outputs(paths: SearchOutputs, trials: pd.DataFrame, metrics: dict, tracker: Tracker) -> None:
    with io.atomic_path(paths.trials_csv) as tmp:
        trials.to_csv(tmp, index=False)
    io.write_json(paths.best, {**chosen(metrics), "trial": metrics["best_trial"], "val_error": metrics["best_val_error"]})
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not math.isnan(v)})
    for path in (paths.best, paths.metrics, paths.trials_csv):
        tracker.log_artifact(path)
