"""pipeline.mlflow_record against a SQLite store: after `dvc repro`, the parent run holds every stage
instance (those DVC found current recorded from their committed outputs) and the pipeline's answer."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from pipeline import io
from pipeline.mlflow_record import (CHANGED_PARAM, DESCRIPTION, NOTE_TAG, SUMMARY_TABLE, VERDICT_TABLE, after_repro,
                                    record)
from pipeline.tracking import PARENT_KEY_TAG, stage_run
from pipeline.config import load_params
from test_tracking import clean_env, sqlite_uri  # noqa: F401 (fixtures: no tracking variables leak in; one DB)

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
# dvc stage list: validate records no run; quality@new has not run yet (no dvc.lock entry);
# quality@gone is in dvc.lock only (no longer defined).
DEFINED = ["validate", "prepare", "baseline", "drmad@-4.0", "drmad@-2.0", "quality@new", "arena@0", "report"]
LOCKED = ["validate", "prepare", "baseline", "drmad@-4.0", "drmad@-2.0", "arena@0", "report", "quality@gone"]
VERDICT = {"mlp": {"baseline": {"test_error_mean": 0.165, "test_error_low": 0.14, "test_error_high": 0.19,
                                "diff_mean": None, "tuning_work": 0.0, "tuning_wall_s": 0.0},
                   "tpe": {"test_error_mean": 0.082, "test_error_low": 0.07, "test_error_high": 0.094,
                           "diff_mean": -0.083, "diff_low": -0.09, "diff_high": -0.076, "tuning_work": 9000.0,
                           "tuning_wall_s": 12.5}}}


def git(repo: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def workspace(tmp_path, request) -> Path:
    """A git repository holding params.yaml, a dvc.lock, and committed outputs: drmad@-4.0's metrics
    in a first commit, the others in a second."""
    experiment = request.node.name
    text = (ROOT / "params.yaml").read_text().replace("experiment: gbhpo", f"experiment: {experiment}")
    (tmp_path / "params.yaml").write_text(text)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")  # a stand-in: the stage list comes from DEFINED
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n" + "".join(f"  {n}:\n    cmd: x\n" for n in LOCKED))
    io.write_metrics(tmp_path / "metrics/drmad/-4.0.json",
                     {"final_test_error": 0.25, "outcome": "finished", "meta_iterations_completed": 3,
                      "wall_time_s": 7.5, "per_meta": [0.3, 0.2], "methods": {"exact": {"work": 12.0}}})
    git(tmp_path, "init", "-q")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "drmad")
    io.write_metrics(tmp_path / "metrics/baseline.json", {"final_test_error": 0.125, "wall_time_s": 3.0})
    io.write_metrics(tmp_path / "metrics/drmad/-2.0.json", {"final_test_error": 0.5})
    io.write_metrics(tmp_path / "results/arena/0.json", {"methods": {"tpe": {"test_error": 0.08, "test_wrong": [1, 5]}},
                                                         "budget": 60.0})
    io.write_metrics(tmp_path / "reports/verdict.json", VERDICT)
    (tmp_path / "reports/summary.md").write_text("# Verdict\n")
    (tmp_path / "reports/summary.csv").write_text("run,final_test_error,outcome\nbaseline,0.125,finished\n"
                                                  "drmad -4.0,,diverged\n")
    (tmp_path / "reports/figures").mkdir()
    (tmp_path / "reports/figures/test_error_per_epoch.png").write_bytes(b"\x89PNG fake")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "the rest")
    return tmp_path


def children(client: MlflowClient, parent_id: str) -> dict[str, list]:
    experiment_id = client.get_run(parent_id).info.experiment_id
    out: dict[str, list] = {}
    for run in client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"):
        out.setdefault(run.info.run_name, []).append(run)
    return out


def test_restored_stages_get_one_run_each(monkeypatch, sqlite_uri, workspace):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.setenv("PIPELINE_RUN_ID", "live-key")
    with stage_run("baseline", load_params(workspace / "params.yaml"), root=workspace) as run:  # baseline ran
        run.log_metrics({"error/test": 0.125}, step=1)

    done = record(workspace, "live-key", DEFINED)
    client = MlflowClient(sqlite_uri)
    runs = children(client, done.parent_id)
    assert sorted(runs) == sorted(["prepare", "baseline", "drmad:-4.0", "drmad:-2.0", "arena:0", "report"])
    assert all(len(r) == 1 for r in runs.values())  # baseline's live run is not duplicated
    assert sorted(done.restored) == sorted(set(runs) - {"baseline"})
    assert "restored" not in runs["baseline"][0].data.tags
    for name in done.restored:
        run = runs[name][0]
        assert run.data.tags["restored"] == "true" and run.info.status == "FINISHED", name
        assert run.data.params["tracking.experiment"] == "test_restored_stages_get_one_run_each"

    first, second = git(workspace, "rev-list", "--reverse", "HEAD").split()
    drmad = runs["drmad:-4.0"][0].data
    assert drmad.tags["git.commit"] == first and runs["drmad:-2.0"][0].data.tags["git.commit"] == second
    assert drmad.tags["dvc.stage"] == "drmad@-4.0" and drmad.tags["git.dirty"] == "false"
    assert drmad.metrics == {"final_test_error": 0.25, "meta_iterations_completed": 3.0, "wall_time_s": 7.5,
                             "methods/exact/work": 12.0}  # the timings merged back; lists and text left out
    assert runs["arena:0"][0].data.metrics == {"methods/tpe/test_error": 0.08, "budget": 60.0}
    assert runs["report"][0].data.metrics["mlp/tpe/test_error_mean"] == 0.082
    assert runs["prepare"][0].data.tags["git.commit"] == "unknown" and runs["prepare"][0].data.metrics == {}

    again = record(workspace, "live-key", DEFINED)  # a second pass logs nothing twice
    assert again.parent_id == done.parent_id and again.restored == []
    assert {n: len(r) for n, r in children(client, done.parent_id).items()} == {n: 1 for n in runs}


def test_nothing_ran_still_makes_the_parent_with_the_answer(monkeypatch, sqlite_uri, workspace):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    (workspace / "params.yaml").write_text((workspace / "params.yaml").read_text().replace("seed: 0", "seed: 3", 1))
    done = record(workspace, "all-current", DEFINED)

    client = MlflowClient(sqlite_uri)
    parent = client.get_run(done.parent_id)
    assert parent.data.tags[PARENT_KEY_TAG] == "all-current" and parent.info.status == "FINISHED"
    assert parent.info.run_name == f"pipeline:{git(workspace, 'rev-parse', '--short=7', 'HEAD')} seed=3"
    assert len(done.restored) == 6 and set(children(client, done.parent_id)) == set(done.restored)
    assert parent.data.tags[NOTE_TAG] == DESCRIPTION
    assert client.get_experiment(parent.info.experiment_id).tags[NOTE_TAG] == DESCRIPTION
    assert parent.data.params[CHANGED_PARAM] == "seed=3" and parent.data.params["seed"] == "3"
    assert parent.data.params["baseline.epochs"] == "10"
    metrics = parent.data.metrics
    assert metrics["verdict/mlp/tpe/test_error_pct"] == 8.2 and metrics["verdict/mlp/tpe/test_error_high_pct"] == 9.4
    assert metrics["verdict/mlp/tpe/diff_points"] == -8.3 and metrics["verdict/mlp/baseline/test_error_pct"] == 16.5
    assert "verdict/mlp/baseline/diff_points" not in metrics  # null in verdict.json: no number
    assert metrics["verdict/mlp/tpe/test_error_mean"] == 0.082  # as the report stage logs them when it runs
    assert metrics["verdict/mlp/tpe/tuning_wall_s"] == 12.5  # from reports/verdict_timings.json

    report = {f.path for f in client.list_artifacts(done.parent_id, "report")}
    assert {"report/summary.md", "report/summary.csv", "report/verdict.json", "report/test_error_per_epoch.png"} <= report
    root = {f.path for f in client.list_artifacts(done.parent_id)}
    assert {SUMMARY_TABLE, VERDICT_TABLE} <= root
    table = client.load_table(parent.info.experiment_id, SUMMARY_TABLE, run_ids=[done.parent_id])
    assert list(table["run"]) == ["baseline", "drmad -4.0"] and table["final_test_error"].iloc[0] == 0.125
    verdict = client.load_table(parent.info.experiment_id, VERDICT_TABLE, run_ids=[done.parent_id])
    assert verdict.set_index("method").loc["tpe", "test_error_pct"] == 8.2

    record(workspace, "all-current", DEFINED)  # a second pass: no table appended to, nothing logged twice
    assert len(client.load_table(parent.info.experiment_id, SUMMARY_TABLE, run_ids=[done.parent_id])) == 2


def test_pipeline_run_records_after_repro_and_keeps_its_exit_code(monkeypatch, sqlite_uri, workspace, tmp_path_factory):
    """The CLI with a stand-in `dvc` (no plan: test_plan covers it): a failed repro's exit code
    passes through, nothing recorded; a recording failure is one line on stderr and exit code 1."""
    from stages.cli import main

    bin_dir = tmp_path_factory.mktemp("bin")
    dvc = bin_dir / "dvc"
    dvc.write_text("#!/bin/sh\n"
                   'if [ "$1" = repro ]; then exit "${FAKE_REPRO_EXIT:-0}"; fi\n'
                   'if [ "$1 $2" = "stage list" ]; then [ -n "$FAKE_LIST_FAILS" ] && { echo "ERROR: broken" >&2; exit 1; }\n'
                   f'  printf "%s\\n" {" ".join(DEFINED)}; exit 0; fi\nexit 9\n')
    dvc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")  # the stand-in first
    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    monkeypatch.chdir(workspace / "metrics")  # as dvc does, the project is found above the current folder
    experiment = "test_pipeline_run_records_after_repro_and_keeps_its_exit_code"
    client = MlflowClient(sqlite_uri)

    def runs() -> list:
        found = client.get_experiment_by_name(experiment)
        return client.search_runs([found.experiment_id]) if found else []

    monkeypatch.setenv("FAKE_REPRO_EXIT", "3")
    assert CliRunner().invoke(main, ["run", "--no-plan"]).exit_code == 3 and runs() == []
    monkeypatch.setenv("FAKE_REPRO_EXIT", "0")
    result = CliRunner().invoke(main, ["run", "--no-plan", "--dry"])
    assert result.exit_code == 0 and runs() == []  # nothing ran or was restored
    result = CliRunner().invoke(main, ["run", "--no-plan"])
    assert result.exit_code == 0, result.output
    assert sorted(r.info.run_name for r in runs() if r.data.tags.get("restored") == "true") == sorted(
        ["prepare", "baseline", "drmad:-4.0", "drmad:-2.0", "arena:0", "report"])

    monkeypatch.setenv("FAKE_LIST_FAILS", "1")
    result = CliRunner().invoke(main, ["run", "--no-plan"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: pipeline run: ") and "dvc stage list" in lines[0]
    assert "Traceback" not in result.output


def test_an_unusable_backend_is_one_line(monkeypatch, workspace, capsys):
    monkeypatch.chdir(workspace)
    (workspace / "store").write_text("a file where the database's folder should be\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'store' / 'mlflow.db'}")
    monkeypatch.setattr("pipeline.mlflow_record.defined_stages", lambda root: DEFINED)
    assert after_repro("broken", []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: pipeline run: ") and "store/mlflow.db" in err[0]
