"""MLflow, complete: after `dvc repro` in `pipeline run`, the pipeline's parent run holds the whole
pipeline, whether its stages ran or DVC found them current (a fresh clone restores most of them).

- Every stage instance of the pipeline (`dvc stage list`, those with an entry in dvc.lock) that
  recorded no run under this pipeline's parent gets one now, from its committed outputs: its
  metrics file's numbers (timings merged back, `inputs.read_metrics`), the params, tagged
  `restored=true` and with `git.commit`, the commit that last changed that metrics file.
- The parent run (found or created by tracking's own rule, so it exists even when nothing ran)
  gets a description (`mlflow.note.content`, on the experiment too), the params, the params that
  differ from the committed params.yaml as the param `changed` (a column in the runs table; the
  `params.changed` tag is not), the verdict in percent (`verdict/<arena>/<method>/test_error_pct`,
  ...), the report's files under `report/` where the report stage did not log them itself, and
  the report's summary and the verdict as MLflow tables (`summary_table.json`, `verdict_table.json`).

Running it twice under one parent logs nothing twice. Only `stages/cli.py` imports this module:
no stage depends on it.
"""
from __future__ import annotations

import math
import os
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pandas as pd
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline import inputs
from pipeline.config import PARAMS_FILE, Params, flatten, load_params
from pipeline.errors import USER_ERRORS, TrackingError
from pipeline.layout import STAGES, Outputs
from pipeline.tracking import (BACKEND_ERRORS, MLFLOW_HTTP_DEFAULTS, _check_reachable, _experiment_id, _git,
                               _parent_run, _run_tags, _setup_lock, backend_error, params_changed, tracking_uri)

NOTE_TAG = "mlflow.note.content"  # MLflow's description of an experiment or a run
RESTORED_TAG = "restored"
CHANGED_PARAM = "changed"
LOCK_FILE = "dvc.lock"
SUMMARY_TABLE, VERDICT_TABLE = "summary_table.json", "verdict_table.json"
# verdict.json's fractions in the report's units: test error in %, differences in points.
PERCENT = {"test_error_mean": "test_error_pct", "test_error_low": "test_error_low_pct",
           "test_error_high": "test_error_high_pct", "diff_mean": "diff_points", "diff_low": "diff_low_points",
           "diff_high": "diff_high_points"}

DESCRIPTION = (
    "Gradient-based hyperparameter optimisation, reproducibly: hypergradient tuners (DrMAD, exact reversible "
    "learning, online hypergradients) against the hand-set baseline, random search, TPE and Hyperband in a "
    "DenseNet arena and an MNIST MLP arena, every hypergradient checked against the exact one. Each parent run "
    "`pipeline:<commit> <changed params>` (or `pipeline:<experiment>`) is one `pipeline run` (`dvc repro`); its "
    "children are the stage runs, one per stage instance (`stage` or `stage:instance`). Children tagged "
    "`restored=true` did not run this time: DVC found their outputs current, and they are recorded from the "
    "committed outputs (`git.commit`: the commit that last changed them). The answer is on the parent: the "
    "metrics `verdict/<arena>/<method>/test_error_pct` (mean over seeds; `_low_pct`/`_high_pct`: "
    "its interval at `final.confidence`) and `diff_points` (minus the baseline, points), the table `verdict_table.json`, and the artifacts "
    "`report/summary.md` (one line per arena first) and the report's figures `report/*.png`; in the repository, "
    "reports/summary.md and reports/verdict.json.")


@dataclass(frozen=True)
class Instance:
    """One stage instance of dvc.yaml: `drmad@-4.0` is Instance("drmad", "-4.0")."""
    stage: str
    instance: str | None = None

    @classmethod
    def parse(cls, dvc_name: str) -> "Instance":
        stage, _, instance = dvc_name.partition("@")
        return cls(stage, instance or None)

    @property
    def dvc_name(self) -> str:
        return f"{self.stage}@{self.instance}" if self.instance else self.stage

    @property
    def run_name(self) -> str:
        """The name its live run has (tracking.stage_run's rule)."""
        return f"{self.stage}:{self.instance}" if self.instance else self.stage


def metrics_file(root: Path, item: Instance) -> Path | None:
    """Where the instance's results live (pipeline/layout.py), None for a stage without (prepare)."""
    out = Outputs(root)
    if item.stage == "prepare":
        return None
    if item.stage == "arena":
        return out.arena(item.instance)
    if item.stage == "report":
        return out.report().verdict_json
    where = getattr(out, item.stage)
    return (where(item.instance) if item.instance else where()).metrics


def numeric_leaves(node: object, prefix: str = "") -> dict[str, float]:
    """A results mapping's numbers, nested keys joined with '/' (as stages name their metrics);
    lists (per-meta-iteration series, wrong test images) and text are left out."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in numeric_leaves(value, f"{prefix}{key}/").items()}
    if isinstance(node, (int, float)) and prefix:  # bools too, as 0/1: the stages log them so
        return {prefix.rstrip("/"): float(node)}
    return {}


def defined_stages(root: Path) -> list[str]:
    """`dvc stage list --name-only`: the stage instances of the current dvc.yaml and params."""
    try:
        done = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=root, capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TrackingError(f"`dvc stage list` failed ({type(exc).__name__}): cannot tell the pipeline's stages") from None
    if done.returncode:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise TrackingError(f"`dvc stage list` failed ({last}): cannot tell the pipeline's stages")
    return done.stdout.split()


def stage_instances(root: Path, defined: Iterable[str]) -> list[Instance]:
    """The instances of `defined` that have outputs (an entry in dvc.lock; entries of stages no
    longer defined are left out) and that record MLflow runs (validate does not), in dvc.yaml's order."""
    lock = root / LOCK_FILE
    try:
        locked = set((yaml.safe_load(lock.read_text()) or {}).get("stages", {}))
    except FileNotFoundError:
        raise TrackingError(f"{lock}: missing; run `dvc repro` first") from None
    except yaml.YAMLError:
        raise TrackingError(f"{lock}: not valid YAML") from None
    return [Instance.parse(name) for name in defined if name in locked and Instance.parse(name).stage in STAGES]


def last_commit(root: Path, path: Path | None) -> tuple[str, str]:
    """(git.commit, git.dirty) of an output: the commit that last changed it ("unknown" when none
    did, or there is no file), and whether the file differs from that commit."""
    if path is None or not path.is_file():
        return "unknown", "unknown"
    relative = os.path.relpath(path, root)
    commit = (_git(root, "log", "-1", "--format=%H", "--", relative) or "").strip()
    status = _git(root, "status", "--porcelain", "--", relative)
    return commit or "unknown", "unknown" if status is None else str(bool(status.strip())).lower()


@contextmanager
def _pipeline_key(key: str) -> Iterator[None]:
    """tracking's parent lookup reads the key from PIPELINE_RUN_ID."""
    before = os.environ.get("PIPELINE_RUN_ID")
    os.environ["PIPELINE_RUN_ID"] = key
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PIPELINE_RUN_ID", None)
        else:
            os.environ["PIPELINE_RUN_ID"] = before


def _children(client: MlflowClient, experiment_id: str, parent_id: str) -> set[str]:
    """Run names already recorded under the parent."""
    names, token = set(), None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'", page_token=token)
        names |= {run.info.run_name for run in page}
        if not (token := page.token):
            return names


def _log_restored(client: MlflowClient, experiment_id: str, parent_id: str, root: Path, item: Instance,
                  params: Params) -> str:
    path = metrics_file(root, item)
    metrics = numeric_leaves(inputs.read_metrics(path)) if path is not None and path.is_file() else {}
    commit, dirty = last_commit(root, path)
    tags = {MLFLOW_PARENT_RUN_ID: parent_id, RESTORED_TAG: "true", "dvc.stage": item.dvc_name, "git.commit": commit,
            "git.dirty": dirty, "host": socket.gethostname()}
    if path is not None:
        tags["restored.from"] = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    run_id = client.create_run(experiment_id, run_name=item.run_name, tags=resolve_tags(tags)).info.run_id
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in flatten(params).items()])
    if (root / PARAMS_FILE).is_file():
        client.log_artifact(run_id, str(root / PARAMS_FILE))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def verdict_percent(verdict: dict) -> dict[str, float]:
    """The verdict's test errors in % and its differences to the baseline in points."""
    return {f"verdict/{arena}/{method}/{name}": round(100 * entry[key], 6)
            for arena, methods in verdict.items() for method, entry in methods.items()
            for key, name in PERCENT.items() if isinstance(entry.get(key), (int, float))}


def verdict_table(verdict: dict) -> pd.DataFrame:
    """One row per arena and method: the verdict's numbers, errors in % and differences in points."""
    rows = []
    for arena, methods in verdict.items():
        for method, entry in methods.items():
            row = {"arena": arena, "method": method}
            for key, value in entry.items():
                row[PERCENT.get(key, key)] = round(100 * value, 6) if key in PERCENT and value is not None else value
            rows.append(row)
    return pd.DataFrame(rows)


def _jsonable(frame: pd.DataFrame) -> pd.DataFrame:
    """NaN as null: MLflow writes tables as JSON, where NaN is not a value."""
    return frame.astype(object).where(frame.notna(), None)


def _complete_parent(client: MlflowClient, experiment_id: str, parent_id: str, root: Path, params: Params) -> None:
    if client.get_experiment(experiment_id).tags.get(NOTE_TAG) != DESCRIPTION:
        client.set_experiment_tag(experiment_id, NOTE_TAG, DESCRIPTION)
    run = client.get_run(parent_id)
    tags = [RunTag(NOTE_TAG, DESCRIPTION)] if run.data.tags.get(NOTE_TAG) != DESCRIPTION else []
    wanted = {**{k: str(v) for k, v in flatten(params).items()}, CHANGED_PARAM: params_changed(root) or "none"}
    params_ = [Param(k, v) for k, v in wanted.items() if k not in run.data.params]  # params cannot change
    report = Outputs(root).report()
    metrics: dict[str, float] = {}
    verdict = inputs.read_metrics(report.verdict_json) if report.verdict_json.is_file() else {}
    if verdict:
        metrics |= verdict_percent(verdict)
        # The report stage logs the verdict's own numbers when it runs; a restored report did not.
        metrics |= {f"verdict/{k}": v for k, v in numeric_leaves(verdict).items()}
    now = int(time.time() * 1000)
    client.log_batch(parent_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()
                                         if k not in run.data.metrics and math.isfinite(v)],
                     params=params_, tags=tags)

    # What the report stage logs to the parent when it runs (tracker.log_parent_artifact(target, "report")).
    logged = {Path(f.path).name for f in client.list_artifacts(parent_id, "report")}
    files = [report.summary_md, report.summary_csv, report.quality_csv, report.verdict_json, report.verdict_seeds,
             *sorted(report.figures.glob("*.png"))]
    for path in files:
        if path.is_file() and path.name not in logged:
            client.log_artifact(parent_id, str(path), "report")
    tables = {Path(f.path).name for f in client.list_artifacts(parent_id)}
    if report.summary_csv.is_file() and SUMMARY_TABLE not in tables:  # log_table appends to an existing one
        client.log_table(parent_id, _jsonable(inputs.read_csv(report.summary_csv)), SUMMARY_TABLE)
    if verdict and VERDICT_TABLE not in tables:
        client.log_table(parent_id, _jsonable(verdict_table(verdict)), VERDICT_TABLE)


@dataclass(frozen=True)
class Recorded:
    parent_id: str
    restored: list[str]  # run names logged now


def record(root: Path, key: str, defined: Iterable[str] | None = None) -> Recorded:
    """Complete the parent run of the pipeline execution `key` (PIPELINE_RUN_ID): a run for every
    stage instance that recorded none under it, then the parent's own record. `defined`: the stage
    instances (default: `dvc stage list`)."""
    root = Path(root)
    params = load_params(root / PARAMS_FILE)
    items = stage_instances(root, defined_stages(root) if defined is None else defined)
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        _check_reachable(uri)
    try:
        with _pipeline_key(key), _setup_lock(uri):
            client = MlflowClient(uri)
            experiment_id = _experiment_id(client, params.tracking.experiment, uri)
            parent_id = _parent_run(client, experiment_id, _run_tags("pipeline", root, None))
        status = "FAILED"
        try:
            recorded = _children(client, experiment_id, parent_id)
            restored = [item.run_name for item in items if item.run_name not in recorded]
            for item in items:
                if item.run_name not in recorded:
                    _log_restored(client, experiment_id, parent_id, root, item, params)
            _complete_parent(client, experiment_id, parent_id, root, params)
            status = "FINISHED"
        finally:
            client.set_terminated(parent_id, status)
    except BACKEND_ERRORS as exc:
        raise backend_error(uri, exc) from exc
    return Recorded(parent_id, restored)


NOT_A_RUN = ("--dry", "-h", "--help")  # `dvc repro` options after which nothing ran or was restored


def find_root(start: Path) -> Path:
    """The DVC project holding `start` (dvc.yaml's folder), as `dvc repro` finds it."""
    start = start.resolve()
    return next((d for d in (start, *start.parents) if (d / "dvc.yaml").is_file()), start)


def after_repro(key: str, args: Iterable[str] = ()) -> int:
    """`pipeline run`'s last step, after `dvc repro ARGS` succeeded: 0 when recorded, else 1 after
    one line on stderr (the stages' results are in place; only their MLflow record is incomplete)."""
    import click

    from pipeline import tracking
    if any(arg in NOT_A_RUN for arg in args):
        return 0
    try:
        done = record(find_root(Path.cwd()), key)
    except Exception as exc:  # whatever failed, one line: the pipeline itself succeeded
        tracking.drop_library_logs()
        what = str(exc) if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {exc}"
        click.echo(f"error: pipeline run: the stages succeeded, recording them in MLflow did not: "
                   f"{what.strip().splitlines()[0] if what.strip() else type(exc).__name__}", err=True)
        return 1
    if done.restored:
        click.echo(f"MLflow: {len(done.restored)} stage run(s) recorded from their committed outputs "
                   f"(restored=true) under parent run {done.parent_id}")
    return 0
