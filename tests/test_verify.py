"""`pipeline verify`: a rerun compared with the workspace's metrics, said in the right words."""
import json
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
