"""Data-parallel training under real torchrun (gloo on CPU): two ranks train and reverse like
one process, and a DenseNet stage asked for two processes runs, logs and writes once."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import data
from pipeline.config import parse_params
from helpers import rel, tiny_settings

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("data_parallel_worker.py")


def torchrun(*args: str, processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **extra}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker alone, under torchrun on one rank and on two."""
    out = tmp_path_factory.mktemp("dp")
    commands = {"alone": [sys.executable, str(WORKER)], "one": torchrun(str(WORKER), processes=1),
                "two": torchrun(str(WORKER), processes=2)}
    for name, command in commands.items():
        subprocess.run([*command, str(out / f"{name}.pt")], check=True, env=env(), timeout=300,
                       capture_output=True)
    return {name: torch.load(out / f"{name}.pt", weights_only=True) for name in commands}


def test_two_ranks_train_and_reverse_like_one_process(runs):
    one, two = runs["alone"], runs["two"]
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert rel(two["weights"], one["weights"]) < 1e-10
    for hvp, reference in one["hypergradients"].items():
        assert reference.norm() > 0
        assert rel(two["hypergradients"][hvp], reference) < 1e-10, hvp


def test_every_per_epoch_count_on_two_ranks_is_the_one_process_count(runs):
    """Each rank sees half of every batch: its wrong predictions are summed over the ranks and its
    loss averaged, so the epoch's training error is one process's exactly and its loss to rounding."""
    one, two = runs["alone"], runs["two"]
    assert len(one["train_errors"]) == 3 and any(e > 0 for e in one["train_errors"])
    assert two["train_errors"] == one["train_errors"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-12)


def test_one_rank_under_torchrun_is_the_plain_process_bit_for_bit(runs):
    alone, one = runs["alone"], runs["one"]
    assert torch.equal(one["weights"], alone["weights"])
    for hvp in alone["hypergradients"]:
        assert torch.equal(one["hypergradients"][hvp], alone["hypergradients"][hvp])


TINY = tiny_settings(processes=2, baseline={"epochs": 3, "batch_size": 32, "last_n": 2},
                     adaptive={"variants": {"k100": {"every": 2, "window": 2}}})


def write_params(workspace: Path, change: dict) -> None:
    """The shipped params.yaml with `change`'s sections updated."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in change.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    (workspace / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.fixture
def workspace(tmp_path):
    data.prepare(parse_params(TINY).data, tmp_path / "data" / "prepared")
    write_params(tmp_path, TINY)
    return tmp_path


def baseline_stage(workspace: Path, **popen) -> subprocess.Popen:
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    return subprocess.Popen([sys.executable, "-m", "stages.baseline"], cwd=workspace, text=True,
                            env=env(MLFLOW_TRACKING_URI=uri), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def stage_runs(workspace: Path):
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("gbhpo")
    return client, client.search_runs([experiment.experiment_id], "tags.`mlflow.runName` = 'baseline'")


def test_a_densenet_stage_asked_for_two_processes_logs_and_writes_once(workspace):
    stage = baseline_stage(workspace)
    stdout, stderr = stage.communicate(timeout=600)
    assert stage.returncode == 0, stderr
    assert stdout.count("baseline finished") == 1  # the closing line from rank 0 alone
    metrics = json.loads((workspace / "metrics/baseline.json").read_text())
    assert metrics["epochs_completed"] == 3
    client, runs = stage_runs(workspace)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["processes"] == "2"
    history = client.get_metric_history(runs[0].info.run_id, "error/val")
    assert sorted(m.step for m in history) == [1, 2, 3]  # each epoch logged once
    assert not list(workspace.glob("models/.*.tmp"))


def test_a_failed_rank_fails_the_stage_and_the_rerun_resumes(workspace):
    write_params(workspace, tiny_settings(TINY, baseline={"epochs": 20}))
    stage = baseline_stage(workspace)
    checkpoint = workspace / "checkpoints/baseline.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and time.monotonic() < deadline and stage.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), stage.communicate()[1]
    listening = []
    for p in [psutil.Process(stage.pid), *psutil.Process(stage.pid).children(recursive=True)]:
        try:
            listening += [c.laddr for c in p.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:  # a short-lived helper that ended meanwhile
            pass
    assert all(address.ip in ("127.0.0.1", "::1") for address in listening), listening  # nothing on other interfaces
    rank1 = [p for p in psutil.Process(stage.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].kill()
    killed = time.monotonic()
    stage.communicate(timeout=120)
    assert stage.returncode != 0 and time.monotonic() - killed < 60
    assert not (workspace / "metrics/baseline.json").exists()  # nothing half-done is an output

    rerun = baseline_stage(workspace)
    stdout, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, stderr
    metrics = json.loads((workspace / "metrics/baseline.json").read_text())
    assert metrics["epochs_completed"] == 20
    client, runs = stage_runs(workspace)
    first_epoch = {r.info.run_id: [m.step for m in client.get_metric_history(r.info.run_id, "error/val")] for r in runs}
    resumed = [steps for steps in first_epoch.values() if steps and min(steps) > 1]
    assert resumed, first_epoch  # the rerun started after the checkpointed epochs
