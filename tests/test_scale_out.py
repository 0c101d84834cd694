"""Scale-out on real parts: the tracking service (PostgreSQL + mlflow server) and two search
workers on one Optuna study in that PostgreSQL."""
import os
import re
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from pipeline import service

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("initdb") is None, reason="PostgreSQL server binaries not installed")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tracking():
    root = Path(tempfile.mkdtemp(prefix="service-", dir="/tmp"))  # PostgreSQL's user must reach it
    root.chmod(0o755)
    started = service.start(root / "svc", port=free_port(), db_port=free_port())
    try:
        yield started
    finally:
        service.stop(root / "svc")
        shutil.rmtree(root, ignore_errors=True)


def trials_of(storage: optuna.storages.RDBStorage) -> list[optuna.trial.FrozenTrial]:
    """The trials of the one study in `storage` (none before a process has created it)."""
    summaries = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summaries[0].study_name, storage=storage).get_trials() if summaries else []


def wait_for(storage: optuna.storages.RDBStorage, until, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll until `until(trials)` holds, failing if `process` ends first. One storage, one
    connection pool: an engine per poll would exhaust PostgreSQL's connections."""
    deadline = time.monotonic() + timeout
    while not until(trials_of(storage)):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-2000:]
        time.sleep(0.1)


def test_two_workers_and_the_stage_finish_exactly_the_planned_trials(tracking, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(device="cpu")
    raw["data"].update(val_size=60, test_size=60, train_size=96)
    raw["model"].update(depth=7, growth_rate=4, init_maps=4)
    raw["baseline"].update(batch_size=32)
    raw["adaptive"]["variants"]["k131"]["val_size"] = 50
    url = tracking.database_url("optuna")
    raw["search"].update(samplers=["random"], trial_epochs=1, budget=15, storage=url,
                         heartbeat_s=300)  # the paused worker below stays alive
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking.tracking_uri,
           "PIPELINE_RUN_ID": "scale-out-test"}
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, check=True, capture_output=True)
    command = [sys.executable, "-m", "stages.search", "--sampler", "random"]

    def start(*extra: str) -> subprocess.Popen:
        return subprocess.Popen([*command, *extra], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    # Deterministic sharing: the first worker is paused on its first trial (a trial takes a few
    # tenths of a second, a process's start-up seconds), so the others must run the rest. The
    # stage must then wait for the paused trial, and the first worker finish it, unduplicated.
    storage = optuna.storages.RDBStorage(url)
    first = start("--worker")
    mine = lambda t: t.user_attrs.get("worker", "").endswith(f":{first.pid}")
    processes = [first]
    try:
        wait_for(storage, lambda trials: any(map(mine, trials)), first)
        first.send_signal(signal.SIGSTOP)
        processes += [start("--worker"), start()]
        placed = lambda t: t.state == TrialState.COMPLETE or mine(t) and t.state == TrialState.RUNNING
        wait_for(storage, lambda trials: sum(map(placed, trials)) == 5, processes[-1])
        first.send_signal(signal.SIGCONT)
        outs = [p.communicate(timeout=600)[0] for p in processes]
    finally:  # a failed wait leaves none behind, paused or running
        for p in processes:
            if p.poll() is None:
                p.kill()
    tails = [out.strip().splitlines()[-3:] for out in outs]
    assert all(p.returncode == 0 for p in processes), tails

    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 5  # floor(15 / 3): each trial is one epoch of 96 // 32 steps
    assert len({t.number for t in done}) == 5 and len({t.params["log10_l2"] for t in done}) == 5
    workers = {t.user_attrs["worker"] for t in done}
    assert len(workers) >= 2 and any(map(mine, done))  # the work was shared
    assert not study.get_trials(states=(TrialState.RUNNING,))

    client = MlflowClient(tracking.tracking_uri)
    experiment = client.get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id
    trials = client.search_runs([experiment], "attributes.run_name LIKE 'trial %'")
    assert sorted(r.data.params["trial"] for r in trials) == sorted(str(t.number) for t in done)  # each once
    assert '"trials": 5' in (tmp_path / "metrics/search/random.json").read_text()


def test_a_server_gone_mid_stage_fails_it_in_seconds_and_a_rerun_completes(tracking, tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update(device="cpu")
    raw["data"].update(val_size=60, test_size=60, train_size=96)
    raw["model"].update(depth=7, growth_rate=4, init_maps=4)
    raw["baseline"].update(batch_size=32, epochs=400)  # long enough to lose the server mid-run
    raw["adaptive"]["variants"]["k131"]["val_size"] = 50
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": tracking.tracking_uri}
    subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=tmp_path, env=env, check=True, capture_output=True)
    stage = subprocess.Popen([sys.executable, "-m", "stages.baseline"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not list((tmp_path / "checkpoints").glob("baseline.pt")):  # a few epochs in
        assert stage.poll() is None, stage.communicate()
        time.sleep(0.2)
    os.killpg(tracking.mlflow_pid, signal.SIGKILL)
    gone = time.monotonic()
    _, err = stage.communicate(timeout=120)
    assert time.monotonic() - gone < 30 and stage.returncode == 2
    errors = [line for line in err.strip().splitlines() if not line.startswith("baseline: epoch")]  # progress lines
    assert errors == [errors[0]] and errors[0].startswith(f"error: tracking at {tracking.tracking_uri} failed"), err
    assert not (tmp_path / "metrics/baseline.json").exists()  # nothing half-written

    root = Path(tracking.root)
    (root / service.STATE_FILE).unlink()
    service._stop_postgres(root)
    back = service.start(root, port=tracking.port, db_port=tracking.db_port)
    raw["baseline"]["epochs"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "stages.baseline"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "metrics/baseline.json").is_file()
    assert any(r.info.status == "FINISHED" for r in MlflowClient(back.tracking_uri).search_runs(
        [MlflowClient(back.tracking_uri).get_experiment_by_name(raw["tracking"]["experiment"]).experiment_id],
        "attributes.run_name = 'baseline'"))


def test_queued_experiments_on_two_workers_all_land_in_the_server(tracking, tmp_path):
    from test_pipeline_e2e import TINY, make_repo

    repo = make_repo(tmp_path / "repo", {**TINY, "baseline": {**TINY["baseline"], "epochs": 1}})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PIPELINE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(repo),
               MLFLOW_TRACKING_URI=tracking.tracking_uri)

    def dvc(*args: str) -> str:
        done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    names = [f"l2-{exponent}" for exponent in (3, 4, 5)]
    for name in names:
        dvc("exp", "run", "--queue", "-n", name, "-S", f"baseline.log10_l2=-{name[-1]}", "baseline")
    dvc("queue", "start", "-j", "2")
    deadline = time.monotonic() + 600
    while (status := dvc("queue", "status")) and ("Queued" in status or "Running" in status):
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 3 and "Failed" not in status, status
    logs = {name: dvc("queue", "logs", name) for name in names}
    assert not any("database is locked" in log or "Traceback" in log for log in logs.values())

    client = MlflowClient(tracking.tracking_uri)
    experiment = client.get_experiment_by_name("gbhpo").experiment_id
    runs = client.search_runs([experiment])
    parents = {r.info.run_id: r.info.run_name for r in runs if r.info.run_name.startswith("pipeline")}
    assert sorted(parents.values()) == [f"pipeline:{n}" for n in names]  # one parent run per experiment
    recorded = sorted((r.info.run_name, r.data.tags.get("dvc.exp_name"), r.info.status) for r in runs
                      if r.info.run_id not in parents)
    assert all(parents[r.data.tags["mlflow.parentRunId"]] == f"pipeline:{r.data.tags['dvc.exp_name']}"
               for r in runs if r.info.run_id not in parents)
    # Every stage an experiment ran, once (DVC's run cache restores a stage it ran before with the
    # same inputs, e.g. the second `prepare`, without running it).
    ran = sorted((stage, name, "FINISHED") for name, log in logs.items()
                 for stage in re.findall(r"Running stage '([^']+)'", log) if stage != "validate")  # checks, logs nothing
    assert recorded == ran and [r for r in ran if r[0] == "baseline"] == [("baseline", n, "FINISHED") for n in names]
    for run in client.search_runs([experiment], "attributes.run_name = 'baseline'"):
        assert run.data.params["baseline.log10_l2"] == f"-{run.data.tags['dvc.exp_name'][-1]}.0"
        assert "error/test" in run.data.metrics
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"errors.csv", "baseline.json"}


@pytest.fixture
def service_dir():
    root = Path(tempfile.mkdtemp(prefix="service-", dir="/tmp"))
    root.chmod(0o755)
    yield root / "svc"
    if (root / "svc" / service.STATE_FILE).is_file() or (root / "svc/postgres/postmaster.pid").is_file():
        service.stop(root / "svc")
    shutil.rmtree(root, ignore_errors=True)


def test_postgres_authenticates_with_the_generated_password(tracking):
    """No trust for local users: a connection without the password is refused, the printed URL works."""
    import sqlalchemy
    secret = Path(tracking.root) / service.PASSWORD_FILE
    assert secret.stat().st_mode & 0o777 == 0o600 and len(tracking.password) >= 24
    with sqlalchemy.create_engine(tracking.database_url("optuna")).connect() as db:
        assert db.execute(sqlalchemy.text("select 1")).scalar() == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    bare = subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(tracking.db_port), "-U", "postgres", "-w", "-c",
                           "select 1", "optuna"], capture_output=True, text=True, env=env)
    assert bare.returncode != 0 and "password" in bare.stderr
    assert '"password"' not in (Path(tracking.root) / service.STATE_FILE).read_text()


def test_a_port_answered_by_another_server_is_one_line_and_leaves_nothing(service_dir):
    """The health check must not be answered by someone else's server on the port."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(service.ConfigError, match=rf"port {port} on 127.0.0.1 is in use \(mlflow server\)"):
            service.start(service_dir, port=port, db_port=free_port())
    assert not (service_dir / service.STATE_FILE).exists()
    assert not service._ours(port, os.getpgid(0))  # the check itself: nothing of ours listens there


def test_an_interrupted_start_stops_what_it_started(service_dir):
    """SIGTERM once PostgreSQL runs: start stops it and leaves no record; after a SIGKILL (no
    chance to clean up), `stop` finds what the dead start left and returns once it has exited."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "stages.cli", "service", "start", "--dir", str(service_dir), "--port",
               str(free_port()), "--db-port", str(free_port())]
    pid_file = service_dir / "postgres/postmaster.pid"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not pid_file.is_file():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        postmaster = int(pid_file.read_text().split()[0])
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if sig == signal.SIGTERM:
            assert proc.returncode == 130 and err.strip().splitlines()[-1].endswith("nothing left running"), err
        else:
            assert (service_dir / service.STATE_FILE).is_file()  # the record a later `stop` uses
            stopped = subprocess.run([*command[:4], "stop", "--dir", str(service_dir)], env=env, capture_output=True,
                                     text=True, timeout=120)
            assert stopped.returncode == 0, stopped.stderr
        assert not pid_file.exists() and not (service_dir / service.STATE_FILE).exists()
        assert not Path(f"/proc/{postmaster}").exists() or "Z" in Path(f"/proc/{postmaster}/stat").read_text().split()[2]


def test_a_server_that_dies_while_starting_gets_one_more_try(service_dir, monkeypatch):
    """Under load the mlflow server's worker can die during start-up: start tries once more; a
    second death is one line with the log's tail."""
    real, calls = subprocess.Popen, []

    def dies_first(command, **kw):
        if "server" not in command:  # PostgreSQL's tools
            return real(command, **kw)
        calls.append(command)
        if len(calls) == 1:
            return real([sys.executable, "-c", "import sys; print('worker died at boot'); sys.exit(3)"], **kw)
        return real(command, **kw)
    monkeypatch.setattr(service.subprocess, "Popen", dies_first)
    started = service.start(service_dir, port=free_port(), db_port=free_port())
    assert len(calls) == 2 and started.mlflow_pid and service._ours(started.port, started.mlflow_pid)
    service.stop(service_dir)

    monkeypatch.setattr(service.subprocess, "Popen", lambda command, **kw: real(
        [sys.executable, "-c", "import sys; print('worker died at boot'); sys.exit(3)"] if "server" in command
        else command, **kw))
    with pytest.raises(service.ConfigError, match=r"exited \(3\) twice; see .*mlflow.log: .*worker died at boot"):
        service.start(service_dir, port=free_port(), db_port=free_port())
    assert not (service_dir / service.STATE_FILE).exists() and not (service_dir / "postgres/postmaster.pid").exists()
