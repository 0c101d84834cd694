"""One line for every fault in what a stage reads from another: the file and the stage that writes
it, never a traceback; names that become file names are validated with params.yaml."""
import json

import pytest
import torch

from pipeline.layout import Outputs
from pipeline import inputs, io
from pipeline.config import ConfigError, parse_params
from pipeline.experiments import final, search, verdict
from helpers import tiny_params, tiny_settings

TINY = tiny_settings(drmad={"inits": [-4.0]}, search={"samplers": ["random"], "trial_epochs": 1, "budget": 10})


def one_line(err: pytest.ExceptionInfo, *words: str) -> None:
    text = str(err.value)
    assert "\n" not in text and all(w in text for w in words), text


@pytest.mark.parametrize("path, stage", [
    ("metrics/final/search.json", "final@search"), ("results/search/tpe/best.json", "search@tpe"),
    ("results/tune/drmad.pt", "tune@drmad"), ("metrics/tune/search.json", "tune@search"),
    ("results/drmad/-4.0/hypers.pt", "drmad@-4.0"), ("metrics/drmad/-7.0.json", "drmad@-7.0"),
    ("metrics/quality/thesis-200.json", "quality@thesis-200"), ("plots/adaptive/k100/epochs.csv", "adaptive@k100"),
    ("metrics/baseline.json", "baseline")])
def test_each_output_names_its_stage(path, stage):
    assert inputs.writer_of(__import__("pathlib").Path(path)) == stage


@pytest.mark.parametrize("kind", ["search", "drmad"])
@pytest.mark.parametrize("damage, words", [("truncated", "truncated"), ("list", "holds a list"),
                                           ("no seed", "lacks random at seed"), ("no keys", "lacks random at seed")])
def test_broken_tuning_results_stop_final_in_one_line(tmp_path, kind, damage, words):
    path = tmp_path / f"results/tune/{kind}.pt"
    method = "random" if kind == "search" else "drmad -4"
    entry = {"outcome": "finished", "tuning_work": 1.0, "tuning_wall_s": 1.0, "log10_l2": -3.0, "alpha": 1.0,
             "l2_coefficients": {"w": torch.ones(3)}}
    payload = {"list": [1], "no seed": {method: {"seed0": entry}}, "no keys": {method: {"seed0": {"outcome": "finished"}}}}.get(
        damage, {method: {"seed0": entry}})
    io.save_torch(path, payload)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(inputs.InputError) as err:
        final.finalists(parse_params({**TINY, "final": {"seeds": [0, 1]}}), kind, tmp_path)
    one_line(err, f"results/tune/{kind}.pt", words.replace("random", method), f"dvc repro tune@{kind}")


def test_a_missing_tuning_names_its_stage(tmp_path):
    with pytest.raises(inputs.InputError) as err:
        final.finalists(parse_params(TINY), "search", tmp_path)
    one_line(err, "search.pt: missing", "dvc repro tune@search")


def test_an_empty_final_metrics_file_stops_the_verdict_in_one_line(tmp_path):
    (tmp_path / "metrics/final").mkdir(parents=True)
    (tmp_path / "metrics/final/baseline.json").write_text("{}")
    with pytest.raises(inputs.InputError) as err:
        verdict.per_seed(tmp_path)
    one_line(err, "metrics/final/baseline.json", "lacks methods, test_size", "final@baseline")
    (tmp_path / "metrics/final/baseline.json").write_text(json.dumps({"methods": {"baseline": {}}, "test_size": 5}))
    with pytest.raises(inputs.InputError) as err:
        verdict.per_seed(tmp_path)
    one_line(err, "a method's entry lacks", "final@baseline")


def test_a_drmad_metrics_file_without_its_work_stops_the_search_budget(tmp_path):
    params = tiny_params(TINY, search={"budget": "drmad"})
    io.write_json(tmp_path / "metrics/drmad/-4.0.json", {"outcome": "finished"})
    with pytest.raises(inputs.InputError) as err:
        search.budget(params, tmp_path)
    one_line(err, "metrics/drmad/-4.0.json: lacks work_gradient_equivalents", "drmad@-4.0")


def test_a_truncated_seed_record_is_run_again_not_a_traceback(tmp_path):
    record = tmp_path / "baseline-seed1.json"
    record.write_text('{"key": "abc", "result": {"test_err')
    assert final._record(record) is None
    record.write_text(json.dumps({"key": "abc", "result": {"test_error": 0.1}}))
    assert final._record(record) == {"key": "abc", "result": {"test_error": 0.1}}


def test_a_corrupt_optuna_study_file_is_one_line(tmp_path):
    params = parse_params(TINY)
    paths = Outputs(tmp_path).search("random")
    paths.storage_dir.mkdir(parents=True)
    (paths.storage_dir / "random.db").write_bytes(b"garbage, not SQLite" * 100)
    with pytest.raises(ConfigError) as err:
        search.open_study("random", params, {"digest": "d"}, paths, 10.0)
    one_line(err, "random.db", "not an SQLite database", "delete it")


@pytest.mark.parametrize("section, change", [("adaptive", {"variants": {"a/b": {}}}),
                                             ("quality", {"variants": {"../x": {"protocol": "thesis", "steps": 3}}})])
def test_names_that_become_file_names_are_validated(section, change):
    with pytest.raises(ConfigError) as err:
        parse_params({section: change})
    one_line(err, f"{section}.", "is not a name")


SCRIPT = """
import logging, sys
from stages.common import user_errors_exit_2
from pipeline.errors import TrackingError
import pipeline.tracking

@user_errors_exit_2
def main(fail):
    try:
        raise ValueError("database or disk is full")
    except ValueError:
        logging.getLogger("mlflow.store.db.utils").exception("SQLAlchemy database error")
    if fail:
        raise TrackingError("tracking at sqlite:///x.db failed (database or disk is full)")

main(sys.argv[1] == "fail")
"""


@pytest.mark.parametrize("outcome", ["fail", "succeed"])
def test_mlflow_logging_stays_off_stderr_when_the_stage_reports_a_fault(tmp_path, outcome):
    """A full disk made MLflow log a database error with its traceback (dozens of lines) before the
    stage's own line: held, and dropped when the stage reports the fault; kept otherwise."""
    import subprocess
    import sys
    from pathlib import Path
    (tmp_path / "s.py").write_text(SCRIPT)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(tmp_path / "s.py"), outcome], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=120)
    lines = proc.stderr.strip().splitlines()
    if outcome == "fail":
        assert proc.returncode == 2 and lines == ["error: tracking at sqlite:///x.db failed (database or disk is full)"]
    else:
        assert proc.returncode == 0 and "SQLAlchemy database error" in proc.stderr and "Traceback" in proc.stderr
