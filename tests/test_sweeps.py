"""A sweep as the README shows it: queued `dvc exp run`s log into the repository's MLflow DB."""
import io
import os
import subprocess
import sys
import sqlite3
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from test_pipeline_e2e import TINY, make_repo, sh

pytestmark = pytest.mark.slow


def test_queued_experiments_land_in_mlflow_and_dvc_exp_show(tmp_path):
    repo = make_repo(tmp_path / "repo", {**TINY, "baseline": {**TINY["baseline"], "epochs": 1}})
    for epochs in (1, 2):
        sh(repo, "dvc", "exp", "run", "--queue", "-S", f"baseline.epochs={epochs}", "-n", f"epochs{epochs}", "baseline")
    sh(repo, "dvc", "queue", "start", "-j", "2")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = sh(repo, "dvc", "queue", "status")
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    assert "Success" in status and "Failed" not in status, status
    shown = pd.read_csv(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv")))
    queued = shown[shown["Experiment"].isin(["epochs1", "epochs2"])].set_index("Experiment")
    assert queued["baseline.epochs"].to_dict() == {"epochs1": 1, "epochs2": 2}
    assert queued["final_test_error"].notna().all()  # their metrics came back too

    db = sqlite3.connect(repo / "mlflow.db")  # the repository's DB, not the experiments' temp copies
    epochs = {value for (value,) in db.execute(
        "select p.value from params p join runs r on r.run_uuid = p.run_uuid "
        "where r.name = 'baseline' and r.status = 'FINISHED' and p.key = 'baseline.epochs'")}
    assert epochs == {"1", "2"}
    experiments = {name for (name,) in db.execute(
        "select t.value from tags t join runs r on r.run_uuid = t.run_uuid "
        "where r.name = 'baseline' and t.key = 'dvc.exp_name'")}
    assert experiments == {"epochs1", "epochs2"}


def test_experiments_pinned_one_per_device_as_the_readme_runs_them(tmp_path):
    """`CUDA_VISIBLE_DEVICES=i dvc exp run --temp ... &` for i = 0, 1: both run at once, each
    under its own setting."""
    repo = tmp_path / "repo"
    repo.mkdir()
    stage = {"cmd": "sleep 3; echo {\\\"device\\\": $CUDA_VISIBLE_DEVICES} > m.json", "params": ["x"], "metrics": ["m.json"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": stage}}))
    (repo / "params.yaml").write_text("x: 0\n")
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "one stage")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    runs = [subprocess.Popen(["dvc", "exp", "run", "--temp", "-S", f"x={device + 1}", "-n", f"gpu{device}"], cwd=repo,
                             env={**env, "CUDA_VISIBLE_DEVICES": str(device)}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
            for device in (0, 1)]
    for run in runs:
        assert run.wait(timeout=300) == 0, run.stdout.read()
    shown = pd.read_csv(io.StringIO(sh(repo, "dvc", "exp", "show", "--csv"))).set_index("Experiment")
    assert shown.loc[["gpu0", "gpu1"], "device"].astype(int).tolist() == [0, 1]
