"""`pipeline verify`: a rerun compared with the workspace's metrics, said in the right words."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.verify import compare
from test_pipeline_e2e import TINY, make_repo, sh

COMMITTED = {"final_test_error": 0.020, "best_val_error": 0.010, "wall_time_s": 12.0, "reverse_steps": [18, 20],
             "outcome": "finished"}


def test_identical_ignores_timings_only():
    assert compare(COMMITTED, {**COMMITTED, "wall_time_s": 99.0}, noise=None).verdict == "identical"
    assert compare(COMMITTED, {**COMMITTED, "reverse_steps": [18, 21]}, noise=None).verdict == "differs"


@pytest.mark.parametrize("delta, verdict", [(0.005, "within seed noise"), (0.02, "within seed noise"),
                                            (0.021, "beyond seed noise")])
def test_errors_are_judged_against_twice_the_seed_spread(delta, verdict):
    got = compare(COMMITTED, {**COMMITTED, "final_test_error": 0.020 + delta}, noise=0.01)
    assert got.verdict == verdict and list(got.differences) == ["final_test_error"]


def test_every_non_timing_key_counts():
    """Outcome, counts and work are results too: a change in any of them is never "within seed noise",
    even when every error is; on the committed platform any difference is beyond (bit-identity)."""
    base = {**COMMITTED, "work_gradient_equivalents": 120.0, "epochs": 4, "platform": "cpu x"}
    for key, value in (("outcome", "diverged"), ("epochs", 3), ("work_gradient_equivalents", 238.0),
                       ("reverse_steps", [18, 21])):
        assert compare(base, {**base, key: value}, noise=0.01).verdict == "beyond seed noise", key
    close = {**base, "final_test_error": 0.021, "final_val_loss": 0.3}
    assert compare({**base, "final_val_loss": 0.299}, close, noise=0.01).verdict == "within seed noise"
    assert compare({**base, "final_val_loss": 0.299}, close, noise=0.01, same_platform=True).verdict == "beyond seed noise"
    assert compare(base, {**base, "platform": "cuda y", "wall_time_s": 1.0}, noise=None, same_platform=False).verdict == "identical"


def test_verify_reads_the_workspace_once_at_the_start(tmp_path, monkeypatch):
    """A rerun or an edit in the workspace while verify runs changes nothing it compares."""
    import pipeline.verify as verify
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/x.json").write_text(json.dumps(COMMITTED))
    monkeypatch.setattr(verify, "stage_spec", lambda root, name: ("run x", [], ["metrics/x.json"]))

    def stage_meanwhile(cmd, cwd, **kw):  # the scratch rerun, while the workspace's file changes
        (tmp_path / "metrics/x.json").write_text(json.dumps({**COMMITTED, "final_test_error": 0.9}))
        (cwd / "metrics").mkdir(exist_ok=True)
        (cwd / "metrics/x.json").write_text(json.dumps(COMMITTED))
        return type("Done", (), {"returncode": 0})()
    monkeypatch.setattr(verify.subprocess, "run", stage_meanwhile)
    assert verify.rerun(tmp_path, "x")["metrics/x.json"].verdict == "identical"


@pytest.mark.slow
def test_verify_reruns_a_stage_and_compares(tmp_path):
    repo = make_repo(tmp_path / "repo", TINY)
    sh(repo, "dvc", "repro", "baseline")
    out = sh(repo, sys.executable, "-m", "stages.cli", "verify", "baseline")
    assert "metrics/baseline.json: identical" in out and "one machine and software stack" in out
    metrics = json.loads((repo / "metrics/baseline.json").read_text())
    (repo / "metrics/baseline.json").write_text(json.dumps({**metrics, "final_test_error": metrics["final_test_error"] + 0.5}))
    (repo / "reports").mkdir()
    (repo / "reports/verdict_seeds.csv").write_text("method,seed,test_error\nbaseline,1,0.01\nbaseline,2,0.03\n")
    out = sh(repo, sys.executable, "-m", "stages.cli", "verify", "baseline", ok=False)
    assert "metrics/baseline.json: beyond seed noise" in out and "final_test_error: committed" in out
    assert "no stage 'nope'" in sh(repo, sys.executable, "-m", "stages.cli", "verify", "nope", ok=False)
    (repo / "metrics/baseline.json").write_text(json.dumps({**metrics, "outcome": "diverged", "epochs": 1}))
    out = sh(repo, sys.executable, "-m", "stages.cli", "verify", "baseline", ok=False)  # same platform: exact
    assert "metrics/baseline.json: beyond seed noise" in out and "outcome: committed diverged" in out
    for broken, words in (("{", "is not valid JSON"), ("[]", "holds no metrics mapping")):
        (repo / "metrics/baseline.json").write_text(broken)
        proc = subprocess.run([sys.executable, "-m", "stages.cli", "verify", "baseline"], cwd=repo, capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(repo)})
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
