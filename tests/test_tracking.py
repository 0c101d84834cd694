"""pipeline.tracking against a SQLite store, a real `mlflow server`, and a dead port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from pipeline.config import Params, TrackingConfig
from pipeline.tracking import PARENT_KEY_TAG, TrackingError, pipeline_key, stage_run, tracking_uri

ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME", "PIPELINE_RUN_ID",
       "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No tracking variables leak in from the shell, or out of a test (stage_run sets some)."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    # One DB for the module: creating its schema costs seconds; tests use their own experiment.
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def workspace(tmp_path) -> Path:
    """A committed, clean git repository holding params.yaml."""
    (tmp_path / "params.yaml").write_text("seed: 0\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "params"], cwd=tmp_path, check=True)
    return tmp_path


def params_for(experiment: str) -> Params:
    return Params(tracking=TrackingConfig(experiment=experiment))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def runs_of(client: MlflowClient, experiment: str) -> dict[str, object]:
    exp = client.get_experiment_by_name(experiment)
    return {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}


def test_tracking_uri_precedence(monkeypatch, tmp_path):
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert tracking_uri(Path("/elsewhere")) == f"sqlite:///{tmp_path.resolve()}/repo/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(tmp_path) == "http://127.0.0.1:5000"


def test_pipeline_key_without_wrapper(monkeypatch):
    base = f"{socket.gethostname()}:pgid{os.getpgid(0)}"
    assert pipeline_key() == base
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    assert pipeline_key() == f"{base}:exp-1"
    monkeypatch.setenv("PIPELINE_RUN_ID", "abc")
    assert pipeline_key() == "abc"


def test_stages_share_one_parent(monkeypatch, sqlite_uri, workspace):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-a")
    params = params_for("grouping")
    with stage_run("prepare", params, dataset_digest="d1g3st", root=workspace) as run:
        for step in (1, 2, 3):
            run.log_metrics({"error/train": 1 / step, "loss/val": 2.0 * step}, step=step)
    monkeypatch.setenv("DVC_STAGE", "baseline@small")
    with stage_run("baseline", params, variant="small", root=workspace):
        pass
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-b")
    (workspace / "params.yaml").write_text("seed: 3\n")  # run-b: a changed param, named in its parent
    with stage_run("prepare", params, root=workspace):
        pass

    client = MlflowClient(sqlite_uri)
    exp = client.get_experiment_by_name("grouping")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    parents = [r for r in runs if PARENT_KEY_TAG in r.data.tags]
    commit = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=workspace, capture_output=True,
                            text=True).stdout.strip()
    assert [(p.data.tags[PARENT_KEY_TAG], p.info.run_name, p.info.status) for p in parents] == [
        ("run-a", f"pipeline:{commit}", "FINISHED"), ("run-b", f"pipeline:{commit} seed=3", "FINISHED")]
    children = [r for r in runs if r not in parents]
    assert [(c.info.run_name, c.data.tags["mlflow.parentRunId"], c.info.status) for c in children] == [
        ("prepare", parents[0].info.run_id, "FINISHED"),
        ("baseline:small", parents[0].info.run_id, "FINISHED"),
        ("prepare", parents[1].info.run_id, "FINISHED")]

    first = children[0]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=workspace, capture_output=True, text=True)
    assert first.data.tags["git.commit"] == head.stdout.strip()
    assert first.data.tags["git.dirty"] == "false"
    assert first.data.tags["dvc.stage"] == "prepare"
    assert first.data.tags["dataset.digest"] == "d1g3st"
    assert children[1].data.tags["dvc.stage"] == "baseline@small"
    assert first.data.params["baseline.epochs"] == "10"
    assert first.data.params["baseline.schedule.milestones"] == "[0.5, 0.75]"
    assert first.data.params["tracking.experiment"] == "grouping"
    history = client.get_metric_history(first.info.run_id, "error/train")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    assert [m.step for m in client.get_metric_history(first.info.run_id, "loss/val")] == [1, 2, 3]
    assert [a.path for a in client.list_artifacts(first.info.run_id)] == ["params.yaml"]


def test_failing_stage_marks_runs_failed(monkeypatch, sqlite_uri, workspace):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("PIPELINE_RUN_ID", "run-fail")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-7")
    with pytest.raises(ValueError, match="boom"):
        with stage_run("baseline", params_for("failing"), root=workspace):
            raise ValueError("boom")
    runs = runs_of(MlflowClient(sqlite_uri), "failing")
    assert runs["baseline"].info.status == "FAILED"
    assert runs["baseline"].data.tags["dvc.exp_name"] == "exp-7"
    assert runs["pipeline:exp-7"].info.status == "FAILED"


def test_old_parent_is_not_joined(monkeypatch, sqlite_uri, workspace):
    """A recycled process-group id must not add runs to a parent from another day."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("PIPELINE_RUN_ID", "recycled")
    client = MlflowClient(sqlite_uri)
    old = client.create_run(client.create_experiment("stale"), run_name="pipeline",
                            start_time=int((time.time() - 2 * 86400) * 1000),
                            tags={PARENT_KEY_TAG: "recycled"})
    with stage_run("prepare", params_for("stale"), root=workspace):
        pass
    child = runs_of(client, "stale")["prepare"]
    assert child.data.tags["mlflow.parentRunId"] != old.info.run_id


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port; its whole process group ends with the module."""
    store = tmp_path_factory.mktemp("server")
    port, log = free_port(), store / "server.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
             "--artifacts-destination", str(store / "artifacts")],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner: less CPU
            stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _healthy(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


@pytest.mark.slow
def test_real_server_round_trip(monkeypatch, mlflow_server, workspace):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("PIPELINE_RUN_ID", "served")
    report = workspace / "errors.csv"
    report.write_text("epoch,train_error\n1,0.5\n")
    with stage_run("baseline", params_for("served"), dataset_digest="abc", root=workspace) as run:
        for step in (1, 2):
            run.log_metrics({"error/val": 0.1 * step}, step=step)
        run.log_artifact(report)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # never minutes of retries

    client = MlflowClient(mlflow_server)
    child = runs_of(client, "served")["baseline"]
    assert child.info.status == "FINISHED"
    assert child.data.params["model.depth"] == "10"  # the default: the shipped params.yaml's
    assert child.data.tags["dataset.digest"] == "abc"
    history = client.get_metric_history(child.info.run_id, "error/val")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
    assert sorted(a.path for a in client.list_artifacts(child.info.run_id)) == ["errors.csv", "params.yaml"]
    local = client.download_artifacts(child.info.run_id, "errors.csv", str(workspace / "back"))
    assert Path(local).read_text() == report.read_text()


def test_unreachable_server_fails_fast(monkeypatch, workspace):
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.monotonic()
    with pytest.raises(TrackingError, match=uri):
        with stage_run("prepare", Params(), root=workspace):
            pytest.fail("the block must not run without a tracking server")
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_a_silent_server_fails_within_30_s(monkeypatch, workspace):
    """A loopback port that accepts connections and never answers (a hung host)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        start = time.monotonic()
        with pytest.raises(TrackingError, match=f"{uri} cannot be reached"):
            with stage_run("prepare", Params(), root=workspace):
                pytest.fail("the block must not run without a tracking server")
        assert time.monotonic() - start < 30


def test_dirty_means_code_or_params_not_outputs(workspace):
    from pipeline.tracking import _git_tags
    (workspace / "metrics").mkdir()
    (workspace / "metrics/baseline.json").write_text("{}")  # what stages write during a run
    (workspace / "dvc.lock").write_text("schema: '2.0'\n")
    assert _git_tags(workspace)["git.dirty"] == "false"
    (workspace / "params.yaml").write_text("seed: 1\n")
    assert _git_tags(workspace)["git.dirty"] == "true"
