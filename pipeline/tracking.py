"""MLflow tracking for stages: one run per stage execution, nested under one parent run per
pipeline execution.
The stages of one `dvc repro` are separate processes, so they meet through a shared key
(`pipeline_key`) that tags the parent run. A stage execution also holds its instance's lock
(`runlock`), and a run left RUNNING by a killed earlier attempt is marked KILLED and linked
from the new run (tag `previous_attempt`). Every backend failure (database deleted,
read-only, disk full, server gone) becomes one `TrackingError` line naming the URI.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import subprocess
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol
from urllib.parse import urlsplit

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; parallel first runs may race
    fcntl = None

import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from sqlalchemy.exc import SQLAlchemyError

from pipeline import data_parallel
from pipeline.config import PARAMS_FILE, Params, flatten, read_yaml
from pipeline.runlock import LOCK_DIR, exclusive
from pipeline.errors import TrackingError

BACKEND_ERRORS = (MlflowException, SQLAlchemyError, OSError, requests.RequestException)


def _hold_library_logs() -> logging.handlers.MemoryHandler:
    """MLflow logs its own view of a backend failure (a database error with its traceback, dozens
    of lines) before the stage can say what failed in one line. Hold its records: they reach
    stderr when the process ends (logging's shutdown flushes them), unless `drop_library_logs`
    discarded them because the stage reported a fault."""
    logger = logging.getLogger("mlflow")
    target = logging.StreamHandler() if not logger.handlers else logger.handlers[0]
    held = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1, target=target)
    held.setFormatter(target.formatter)
    logger.handlers = [held]
    logger.propagate = False
    return held


_HELD = _hold_library_logs()


def drop_library_logs() -> None:
    """Forget MLflow's held records: the stage's own one line says what went wrong."""
    with _HELD.lock:
        _HELD.buffer.clear()

PARENT_KEY_TAG = "pipeline.key"
# MLflow 3's UI opens an experiment on its runs (not the GenAI traces overview) with this kind.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# A parent older than this is never joined, so a recycled process-group id starts a new one.
PARENT_MAX_AGE_S = 24 * 3600
# Probe: connection refused fails in ms; a silent host costs at most 3 * (2 + 5) + 2 = 23 s.
PROBE_TRIES, PROBE_TIMEOUT_S, PROBE_PAUSE_S = 3, (2, 5), 1.0
# MLflow's defaults (7 retries with exponential backoff, 120 s timeout) retry for minutes.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class Tracker(Protocol):
    """What the library logs to: a stage's MLflow run (`StageRun`), or `SILENT`, the null tracker
    (library calls without MLflow, data-parallel ranks other than 0). Every method is safe to call."""
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_figure(self, figure, name: str) -> None: ...
    def log_table(self, table, name: str) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_parent_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def child(self, name: str, params: dict[str, object]) -> AbstractContextManager["Tracker"]: ...


def tracking_uri(root: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI`, else the SQLite DB in the repository root.

    dvc sets `$DVC_ROOT` for stage commands; in `dvc exp run --queue` it names the real
    repository rather than the temporary workspace, so queued runs share the repo's DB.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    base = Path(os.environ.get("DVC_ROOT") or root or Path.cwd())
    return f"sqlite:///{base.resolve() / 'mlflow.db'}"


def pipeline_key() -> str:
    """A key shared by every stage process of one pipeline execution, and by no other.

    `PIPELINE_RUN_ID` (set by `pipeline run`) wins. Otherwise: dvc (dvc/stage/run.py, `_run`)
    starts each stage command with a plain `subprocess.Popen` (no `start_new_session`, no
    `setpgid`), so all stages of one `dvc repro` stay in dvc's process group. A
    `dvc queue` worker runs many experiments in its one process group, hence the experiment
    name; the hostname keeps machines sharing a tracking server apart. Limit: a shell without
    job control (a script, CI) runs all its commands in one group, so two plain `dvc repro`
    there share a parent; scripts should use `pipeline run`.
    """
    if key := os.environ.get("PIPELINE_RUN_ID"):
        if "'" in key:  # it goes inside a quoted MLflow filter string
            raise TrackingError(f"PIPELINE_RUN_ID must not contain a quote (got {key!r})")
        return key
    key = f"{socket.gethostname()}:pgid{os.getpgid(0)}"
    exp_name = os.environ.get("DVC_EXP_NAME")
    return f"{key}:{exp_name}" if exp_name else key


def backend_error(uri: str, exc: BaseException) -> TrackingError:
    return TrackingError(f"tracking at {_redact(uri)} failed ({type(exc).__name__}: {_first_line(str(exc))}); "
                         "check that the database or server is there and writable, with free disk space")


@dataclass(frozen=True)
class StageRun:
    """What a stage logs to: the stage's MLflow run."""
    client: MlflowClient
    run_id: str
    parent_id: str | None = None  # the pipeline execution's run (the report puts its summary there)
    uri: str = ""

    def _call(self, method: str, *args, **kwargs):
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except BACKEND_ERRORS as exc:
            raise backend_error(self.uri, exc) from exc

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        self._call("log_batch", self.run_id, metrics=[
            Metric(key, float(value), now, step or 0) for key, value in metrics.items()])

    def set_tag(self, key: str, value: str) -> None:
        self._call("set_tag", self.run_id, key, value)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.run_id, str(path), artifact_path)

    def log_parent_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._call("log_batch", self.parent_id or self.run_id,
                   metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])

    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self._call("log_artifact", self.parent_id or self.run_id, str(path), artifact_path)

    def log_figure(self, figure, name: str) -> None:
        from matplotlib import pyplot as plt  # the caller already chose the backend

        try:
            self._call("log_figure", self.run_id, figure, name)
        finally:
            plt.close(figure)  # stages log a fresh pyplot figure per epoch; free each one

    @contextmanager
    def child(self, name: str, params: dict[str, object]) -> Iterator["StageRun"]:
        """A run nested under this one (a search trial), with its own params; it ends FINISHED,
        or FAILED when the block raises."""
        experiment_id = self._call("get_run", self.run_id).info.experiment_id
        run_id = self._call("create_run", experiment_id, run_name=name, tags={
            MLFLOW_PARENT_RUN_ID: self.run_id, "host": socket.gethostname(), "pid": str(os.getpid())}).info.run_id
        child, status = StageRun(self.client, run_id, self.run_id, self.uri), "FAILED"
        try:
            child._call("log_batch", run_id, params=[Param(key, str(value)) for key, value in params.items()])
            yield child
            status = "FINISHED"
        finally:
            child._call("set_terminated", run_id, status)

    def log_table(self, table, name: str) -> None:
        """A dict or DataFrame as a JSON table artifact (`name` ends in .json)."""
        self._call("log_table", self.run_id, table, name)


class SilentRun:
    """The null tracker: logs nothing (data-parallel ranks other than 0: rank 0 logs the run once)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def set_tag(self, key: str, value: str) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_parent_metrics(self, metrics: dict[str, float]) -> None: ...
    def log_parent_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, table, name: str) -> None: ...

    def log_figure(self, figure, name: str) -> None:
        from matplotlib import pyplot as plt

        plt.close(figure)

    @contextmanager
    def child(self, name: str, params: dict[str, object]) -> Iterator["SilentRun"]:
        yield self


SILENT = SilentRun()


@contextmanager
def stage_run(stage: str, params: Params, *, variant: str | None = None,
              dataset_digest: str | None = None, root: Path | None = None) -> Iterator[StageRun]:
    """Record one stage execution; the run ends FAILED if the block raises, else FINISHED.

    `root` is the stage's workspace (default: the current directory): params.yaml and the
    git state are read there, which under `dvc exp run --queue` is the experiment's copy.
    """
    if not data_parallel.is_main():  # rank 0 alone records the run (and holds the lock)
        yield SilentRun()
        return
    lock_dir = (Path(root) if root else Path.cwd()) / LOCK_DIR
    with exclusive(f"{stage}@{variant}" if variant else stage, lock_dir):
        with _stage_run(stage, params, variant, dataset_digest, root) as run:
            yield run


@contextmanager
def _stage_run(stage: str, params: Params, variant: str | None, dataset_digest: str | None,
               root: Path | None) -> Iterator[StageRun]:
    workspace = Path(root) if root else Path.cwd()
    uri = tracking_uri(root)
    if uri.startswith(("http://", "https://")):
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        _check_reachable(uri)
    tags = _run_tags(stage, workspace, dataset_digest)
    try:
        with _setup_lock(uri):
            # A client bound to `uri`, not mlflow.set_tracking_uri: that would export
            # MLFLOW_TRACKING_URI and so override tracking_uri() for the rest of the process.
            client = MlflowClient(uri)
            experiment_id = _experiment_id(client, params.tracking.experiment, uri)
            parent_id = _parent_run(client, experiment_id, tags)
            name = f"{stage}:{variant}" if variant else stage
            run_id = client.create_run(experiment_id, run_name=name, tags=resolve_tags(
                {**tags, MLFLOW_PARENT_RUN_ID: parent_id, "host": socket.gethostname(),
                 "pid": str(os.getpid())})).info.run_id
            _end_dead_attempts(client, experiment_id, name, run_id)
    except MlflowException as exc:  # bad URI, unwritable DB, deleted experiment
        raise TrackingError(f"tracking at {_redact(uri)}: {_first_line(exc.message)}") from exc
    except BACKEND_ERRORS as exc:
        raise backend_error(uri, exc) from exc
    run, status = StageRun(client, run_id, parent_id, uri), "FAILED"
    try:
        run._call("log_batch", run_id, params=[Param(key, str(value)) for key, value in flatten(params).items()])
        if (workspace / PARAMS_FILE).is_file():
            run.log_artifact(workspace / PARAMS_FILE)
        yield run
        status = "FINISHED"
    finally:
        try:
            run._call("set_terminated", run_id, status)
            # Later stages find the parent by its tag, whatever its status.
            run._call("set_terminated", parent_id, status)
        except TrackingError:
            if status == "FINISHED":
                raise  # the stage's work is done, its record is not: say so
            # the block already failed: its own error is the one to report


def _end_dead_attempts(client: MlflowClient, experiment_id: str, name: str, run_id: str) -> None:
    """Runs of this stage instance on this host still RUNNING though their process is gone (a
    killed attempt) end as KILLED; the new run links the latest of them (`previous_attempt`),
    whose checkpoint it may resume. The instance lock says no live process of ours holds them."""
    host = socket.gethostname().replace("'", "")
    stale = [r for r in client.search_runs(
        [experiment_id], f"attributes.run_name = '{name}' and attributes.status = 'RUNNING' and tags.host = '{host}'",
        order_by=["attributes.start_time DESC"], max_results=50)
        if r.info.run_id != run_id and not _alive(r.data.tags.get("pid"))]
    for dead in stale:
        client.set_terminated(dead.info.run_id, "KILLED")
    if stale:
        client.set_tag(run_id, "previous_attempt", stale[0].info.run_id)


def _alive(pid: str | None) -> bool:
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


@contextmanager
def _setup_lock(uri: str) -> Iterator[None]:
    """One process at a time creates the SQLite schema, the experiment and the parent run:
    parallel stages (`dvc queue start -j 2`) would otherwise race to create the same tables."""
    if not uri.startswith("sqlite:///") or fcntl is None:
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_reachable(uri: str) -> None:
    """Fail in seconds with one line, instead of MLflow retrying for minutes."""
    problem = ""
    for attempt in range(PROBE_TRIES):
        if attempt:
            time.sleep(PROBE_PAUSE_S)
        try:
            answer = requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as exc:
            problem = type(exc).__name__
            continue
        if answer.status_code < 500:  # 401/404 still means a server is there
            return
        problem = f"HTTP {answer.status_code}"
    raise TrackingError(f"MLflow tracking server {_redact(uri)} cannot be reached ({problem}); "
                        "start it or set MLFLOW_TRACKING_URI")


def _redact(uri: str) -> str:
    """The URI without user:password, fit for an error message."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"


def parent_name(tags: dict[str, str]) -> str:
    """What tells one pipeline execution from another: the DVC experiment's name, else the
    commit and the params changed since it."""
    if exp_name := tags.get("dvc.exp_name"):
        return f"pipeline:{exp_name}"
    commit = tags.get("git.commit", "unknown")[:7]
    changed = tags.get("params.changed")
    return f"pipeline:{commit}" + (f" {changed}" if changed else "")


def params_changed(workspace: Path) -> str:
    """`key=value` for each param that differs from the committed params.yaml (empty when none,
    or outside git), at most 250 characters."""
    committed = _git(workspace, "show", f"HEAD:{PARAMS_FILE}")
    if committed is None or not (workspace / PARAMS_FILE).is_file():
        return ""
    try:
        old, new = (_flat(read_yaml(text)) for text in (committed, (workspace / PARAMS_FILE).read_text()))
    except Exception:  # an unparsable file is validation's business, not the run name's
        return ""
    changes = [f"{k}={new.get(k, '<removed>')}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    text = ", ".join(changes)
    return text if len(text) <= 250 else text[:247] + "..."


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    out: dict[str, object] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def _run_tags(stage: str, workspace: Path, dataset_digest: str | None) -> dict[str, str]:
    tags = {**_git_tags(workspace), "dvc.stage": os.environ.get("DVC_STAGE") or stage}
    if changed := params_changed(workspace):
        tags["params.changed"] = changed
    if exp_name := os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = exp_name
    if dataset_digest:
        tags["dataset.digest"] = dataset_digest
    return tags


# What a run's result depends on. The pipeline's own outputs (dvc.lock, metrics/, ...) change
# during every run and would mark every stage after the first as dirty.
SOURCE_PATHS = ("pipeline", "stages", "params.yaml", "dvc.yaml", "scales", "pyproject.toml")


def _git_tags(workspace: Path) -> dict[str, str]:
    """git.commit, and git.dirty: uncommitted changes to the code or the params."""
    commit = _git(workspace, "rev-parse", "HEAD")
    status = _git(workspace, "status", "--porcelain", "--", *SOURCE_PATHS)
    return {"git.commit": commit.strip() if commit else "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status.strip())).lower()}


def _git(workspace: Path, *args: str) -> str | None:
    """stdout of a git command, or None outside a repository or without git."""
    try:
        done = subprocess.run(["git", *args], cwd=workspace, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri),
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # a concurrent stage (dvc queue -j N) created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(f"MLflow experiment {name!r} at {_redact(uri)} is deleted; restore it "
                            "(mlflow experiments restore) or set tracking.experiment")
    if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


def _artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite DB; MLflow's default (./mlruns of the current directory) would
    put them in a `dvc exp --queue` temporary workspace that is deleted afterwards."""
    if not uri.startswith("sqlite:///"):
        return None  # a server chooses its own artifact store
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns").as_uri()


def _parent_run(client: MlflowClient, experiment_id: str, tags: dict[str, str]) -> str:
    """The parent run of this pipeline execution: found by its key tag, else created."""
    key = pipeline_key()
    since_ms = int((time.time() - PARENT_MAX_AGE_S) * 1000)
    found = client.search_runs(
        [experiment_id], f"tags.`{PARENT_KEY_TAG}` = '{key}' and attributes.start_time > {since_ms}",
        max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    parent_tags = {k: v for k, v in tags.items() if k in ("git.commit", "git.dirty", "dvc.exp_name", "params.changed")}
    run = client.create_run(experiment_id, run_name=parent_name(tags), tags={**parent_tags, PARENT_KEY_TAG: key})
    return run.info.run_id
