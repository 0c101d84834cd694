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
    ("threads", 0, ["threads", "1 to 1024", "auto"]),
    ("threads", "all", ["threads", "1 to 1024", "auto"]),
    ("processes", 0, ["processes", ">= 1"]),
    ("processes", 3, ["baseline.batch_size", "split evenly over processes: 3"]),
    ("search.heartbeat_s", 0, ["search.heartbeat_s", ">= 1"]),
    ("quality.variants.thesis-200.protocol", "thesys", ["quality.variants.thesis-200.protocol", "thesis", "standardised"]),
    ("quality.variants.thesis-200.steps", 0, ["quality.variants.thesis-200.steps", ">= 1"]),
    ("quality.protocols.thesis.l2_base", "2", ["quality.protocols.thesis.l2_base", "'e'", "'10'"]),
    ("quality.protocols.thesis.momentum", 0.3, ["quality.protocols.thesis.momentum", ">= 0.5"]),
    ("quality.protocols.thesis.pixels", "raw", ["quality.protocols.thesis.pixels", "unit", "standardised"]),
    ("quality.protocols.thesis.init_scale", 9.0, ["quality.protocols.thesis.init_scale", "scale_bounds"]),
    ("quality.lengths", [200], ["quality.lengths", "unknown key", "variants"]),
    ("trajectory.protocol", "other", ["trajectory.protocol", "thesis"]),
    ("drmad.epochs_start_by_init", {-2.0: 5}, ["drmad.epochs_cap", "epochs_start"]),
    # the verdict's search spaces, budgets and seed lists
    ("search.samplers", ["random", "grid"], ["search.samplers", "'random'", "'tpe'"]),
    ("search.samplers", ["tpe", "tpe"], ["search.samplers", "at most once"]),
    ("search.space.log10_l2", [-1.0, -7.0], ["search.space.log10_l2", "low < high"]),
    ("search.space.log10_alpha", [0.0], ["search.space.log10_alpha", "at least 2"]),
    ("search.space.log10_alpha", [-1.0, 5.0], ["search.space.log10_alpha", "within [-6, 2]"]),
    ("search.space.lr", [0.0, 1.0], ["search.space.lr", "unknown key", "log10_alpha"]),
    ("search.budget", 0, ["search.budget", "drmad", "> 0"]),
    ("search.budget", "all", ["search.budget", "drmad"]),
    ("search.trial_epochs", 0, ["search.trial_epochs", ">= 1"]),
    ("search.storage", "redis://x", ["search.storage", "RDB URL"]),
    ("final.seeds", [1], ["final.seeds", "at least 2"]),
    ("final.seeds", [1, 2, 1], ["final.seeds", "distinct"]),
    ("final.seeds", [1, -2], ["final.seeds", "within [0,"]),
    ("final.seeds", [1, 2.5], ["final.seeds.1", "integer"]),
    ("final.confidence", 1.0, ["final.confidence", "< 1"]),
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


STAGE_COMMANDS = {"prepare": ["stages.prepare"], "baseline": ["stages.baseline"],
                  "drmad": ["stages.drmad", "--init=-4.0"], "adaptive": ["stages.adaptive", "--variant=k100"],
                  "quality": ["stages.quality", "--variant=thesis-200"], "trajectory": ["stages.trajectory"],
                  "report": ["stages.report"], "validate": ["stages.cli", "validate", "--stamp", "checks/params.ok"],
                  "search": ["stages.search", "--sampler=tpe"], "final": ["stages.final", "--kind=drmad"],
                  "tune": ["stages.tune", "--kind=drmad"]}


@pytest.mark.parametrize("stage", list(STAGE_COMMANDS))
def test_stage_exits_2_with_one_line_and_writes_nothing(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("baseline.momentum", 1.5)))
    proc = subprocess.run([sys.executable, "-m", *STAGE_COMMANDS[stage]], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "baseline.momentum" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


FILE_FAULTS = {  # params.yaml text -> words the one-line message must contain
    "empty": ("", ["missing section(s) seed"]),
    "missing section": (None, ["missing section(s) quality"]),
    "duplicate key": ("seed: 0\nseed: 1\n", ["line 2", "duplicate key 'seed'"]),
    "inf": (".inf", ["baseline.alpha", "finite"]),
    "seed past 64 bits": ("2 ** 64", ["seed", "<= 9223372036854775807"]),
}


def fault_text(name: str) -> str:
    raw = default_raw()
    if name == "missing section":
        del raw["quality"]
    elif name == "inf":
        raw["baseline"]["alpha"] = "PLACEHOLDER"
    elif name == "seed past 64 bits":
        raw["seed"] = "PLACEHOLDER"
    else:
        return FILE_FAULTS[name][0]
    return yaml.safe_dump(raw).replace("PLACEHOLDER", {"inf": ".inf", "seed past 64 bits": str(2 ** 64)}.get(name, ""))


@pytest.mark.parametrize("name", list(FILE_FAULTS))
def test_file_faults_are_rejected_not_filled_in(tmp_path, name):
    """No code defaults for what the file left out, no 'last one wins', no infinities."""
    (tmp_path / "params.yaml").write_text(fault_text(name))
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert "\n" not in str(err.value)
    for word in FILE_FAULTS[name][1]:
        assert word in str(err.value), str(err.value)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_bytes(b"seed: 0\ncomment: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text \(byte 0xe9 at offset 20\)"):
        load_params(tmp_path / "params.yaml")


def test_batch_sizes_must_fit_the_training_split():
    with pytest.raises(ConfigError, match=r"baseline.batch_size: at most the 1137 training images"):
        parse_params(with_change("baseline.batch_size", 2000))
    with pytest.raises(ConfigError, match=r"quality.protocols.thesis.batch_size: at most the 3000"):
        parse_params(with_change("quality.protocols.thesis.batch_size", 3001))
    with pytest.raises(ConfigError, match=r"adaptive.variants.k131.val_size: leaves 37 of"):
        parse_params(with_change("adaptive.variants.k131.val_size", 1400))


def test_validate_names_a_cuda_device_this_machine_lacks(tmp_path, monkeypatch):
    """`pipeline validate` knows what the machine can run (here: pretend there is no CUDA)."""
    from click.testing import CliRunner

    from stages.cli import main
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("device", "cuda")))
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result = CliRunner().invoke(main, ["validate", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and "device: cuda" in result.output and "no usable CUDA" in result.output


def test_validate_stamp_is_constant_and_written_only_when_valid(tmp_path):
    from click.testing import CliRunner

    from stages.cli import main
    stamp = tmp_path / "checks/params.ok"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("baseline.epochs", -1)))
    result = CliRunner().invoke(main, ["validate", "--params", str(tmp_path / "params.yaml"), "--stamp", str(stamp)])
    assert result.exit_code == 2 and not stamp.exists()
    texts = []
    for seed in (0, 1):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(with_change("seed", seed)))
        assert CliRunner().invoke(main, ["validate", "--params", str(tmp_path / "params.yaml"), "--stamp",
                                         str(stamp)]).exit_code == 0
        texts.append(stamp.read_bytes())
    assert texts[0] == texts[1]  # other params, same stamp: nothing downstream reruns because of it


def test_a_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    """Nine levels of `&a [*a0, *a0, ...]` would expand to 10^9 nodes (minutes, gigabytes): one line,
    naming the line of the first anchor, at once."""
    import time
    levels = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    (tmp_path / "params.yaml").write_text(Path(ROOT / "params.yaml").read_text() + "\n".join(levels) + "\n")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert time.perf_counter() - started < 10.0  # expanded, it would take minutes and gigabytes
    first = len(Path(ROOT / "params.yaml").read_text().splitlines()) + 1
    assert str(err.value) == (f"{tmp_path / 'params.yaml'}: line {first}: YAML anchors and aliases (&name, *name) are not "
                              "allowed; write each value out")


def test_an_oversized_params_file_is_refused_unread(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text(Path(ROOT / "params.yaml").read_text() + "#" * (1 << 20) + "\n")
    monkeypatch.setattr("pipeline.config.read_yaml", lambda *a: pytest.fail("read an oversized file"))
    with pytest.raises(ConfigError, match=r"params.yaml: 1,0\d\d,\d{3} bytes; at most 1,048,576"):
        load_params(tmp_path / "params.yaml")


def test_the_defaults_are_the_shipped_params():
    """One source of truth: a test or library call that leaves a key out runs what params.yaml
    ships, never a setting nobody runs (the paper's values live in scales/paper.yaml)."""
    shipped = load_params(ROOT / "params.yaml").model_dump()
    assert Params().model_dump() == shipped
