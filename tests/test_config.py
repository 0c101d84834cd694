"""params.yaml validation: every bad input is one line naming the key, exit code 2, no output."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, Params, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def default_raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def with_change(path: str, value):
    raw = default_raw()
    *parents, last = path.split(".")
    node = raw
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return raw


class _Delete:
    def __repr__(self):
        return "<deleted>"


DELETE = _Delete()

BAD = [  # (key path, bad value, words the message must contain)
    ("baseline.epochs", -3, ["baseline.epochs", ">= 1"]),
    ("baseline.epochs", 2.5, ["baseline.epochs", "integer"]),
    ("baseline.epochs", "10", ["baseline.epochs", "integer"]),
    ("baseline.momentum", 1.0, ["baseline.momentum", "< 1"]),
    ("baseline.momentum", -0.1, ["baseline.momentum", ">= 0"]),
    ("baseline.alpha", 0, ["baseline.alpha", "> 0"]),
    ("baseline.nesterov", "yes", ["baseline.nesterov", "bool"]),
    ("baseline.schedule.milestones", [0.75, 0.5], ["baseline.schedule.milestones", "increasing"]),
    ("baseline.schedule.factor", 2.0, ["baseline.schedule.factor", "<= 1"]),
    ("baseline.learning_rate", 0.1, ["baseline.learning_rate", "unknown key", "alpha"]),
    ("data.source", "imagenet", ["data.source", "digits", "cifar10"]),
    ("data.val_size", 5000, ["data.val_size", "1797", "digits"]),
    ("data.test_size", DELETE, ["data.test_size", "no test split"]),
    ("data.val_size", 0, ["data.val_size", ">= 1"]),
    ("model.depth", 41, ["model.depth", "3*n + 4"]),
    ("model.dropout", 1.0, ["model.dropout", "< 1"]),
    ("device", "tpu", ["device", "auto"]),
    ("tracking.experiment", "", ["tracking.experiment"]),
    ("colour", "blue", ["colour", "unknown key", "baseline"]),
    ("hvp", "finite_differences", ["hvp", "double_backward", "forward_over_reverse"]),
    ("quality.runs.thesis-200.protocol", "thesys", ["quality.runs.thesis-200.protocol", "thesis", "standardised"]),
    ("quality.runs.thesis-200.steps", 0, ["quality.runs.thesis-200.steps", ">= 1"]),
    ("quality.protocols.thesis.l2_base", "2", ["quality.protocols.thesis.l2_base", "'e'", "'10'"]),
    ("quality.protocols.thesis.momentum", 0.3, ["quality.protocols.thesis.momentum", ">= 0.5"]),
    ("quality.protocols.thesis.pixels", "raw", ["quality.protocols.thesis.pixels", "unit", "standardised"]),
    ("quality.protocols.thesis.init_scale", 9.0, ["quality.protocols.thesis.init_scale", "scale_bounds"]),
    ("quality.lengths", [200], ["quality.lengths", "unknown key", "runs"]),
    ("paths.protocol", "other", ["paths.protocol", "thesis"]),
    ("drmad.epochs_start_by_init", {-2.0: 5}, ["drmad.epochs_cap", "epochs_start"]),
]


@pytest.mark.parametrize("path,value,words", BAD, ids=[f"{p}={v!r}" for p, v, _ in BAD])
def test_bad_value_names_key_and_rule(path, value, words):
    with pytest.raises(ConfigError) as err:
        parse_params(with_change(path, value))
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_defaults_validate_and_shipped_file_loads():
    assert isinstance(load_params(ROOT / "params.yaml"), Params)


def test_yaml12_exponent_floats(tmp_path):
    # PyYAML alone would read 1e-4 as a string; users write it that way.
    raw = default_raw()
    raw["baseline"]["weight_clip"] = "PLACEHOLDER"
    text = yaml.safe_dump(raw).replace("PLACEHOLDER", "1e3")
    (tmp_path / "params.yaml").write_text(text)
    assert load_params(tmp_path / "params.yaml").baseline.weight_clip == 1000.0


def test_broken_yaml_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text("baseline: [unclosed\n")
    with pytest.raises(ConfigError, match="line"):
        load_params(tmp_path / "params.yaml")


@pytest.mark.parametrize("stage", ["prepare", "baseline"])
def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("baseline.momentum", 1.5)))
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "baseline.momentum" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]
