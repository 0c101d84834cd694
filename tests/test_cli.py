"""The `pipeline` command as a user meets it: its version, summaries that say what each command
does, and what a scale needs said before anything runs."""
import shutil
from pathlib import Path

from click.testing import CliRunner

from pipeline.config import load_params
from pipeline.scale import needs
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_and_whole_summaries():
    assert CliRunner().invoke(main, ["--version"]).output.strip() == "gbhpo 0.1.0"
    listing = CliRunner().invoke(main, ["--help"]).output
    assert "(e.g." not in listing  # a summary cut at an abbreviation's full stop says nothing
    assert "Rerun a stage in a scratch copy" in listing and "Merge scales/NAME.yaml" in listing


def test_the_paper_scale_says_what_it_needs(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "scales", tmp_path / "scales")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    embedded = load_params(tmp_path / "params.yaml")
    assert needs(embedded, has_gpu=False) == []  # the default runs offline on CPUs
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["scale", "paper"], catch_exceptions=False)
    paper = load_params(tmp_path / "params.yaml")
    lines = needs(paper, has_gpu=False)
    assert [line.split(":")[0] for line in lines] == ["data.source", "quality.data.source", "model.depth"]
    assert "GPU" in lines[-1] and all(f"needs: {line}" in out.output for line in lines if "GPU" not in line)
    assert [line.split(":")[0] for line in needs(paper, has_gpu=True)] == ["data.source", "quality.data.source"]
    assert "`pipeline plan --all`" in out.output  # its cost, or how to get it (no calibration cached here)


def test_compare_shows_the_changed_params_and_the_results_they_moved(tmp_path, monkeypatch):
    import json
    import subprocess
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True,
                                    env={"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@localhost", "GIT_COMMITTER_NAME": "t",
                                         "GIT_COMMITTER_EMAIL": "t@localhost", "PATH": "/usr/bin:/bin"})
    verdict = lambda error: {"mlp": {"baseline": {"test_error_mean": 0.165, "diff_mean": None},
                                     "tpe": {"test_error_mean": error, "diff_mean": error - 0.165}}}
    (tmp_path / "reports").mkdir()
    (tmp_path / "params.yaml").write_text("baseline:\n  epochs: 6\n  alpha: 1.0\n")
    (tmp_path / "reports/verdict.json").write_text(json.dumps(verdict(0.0822)))
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "results")
    (tmp_path / "params.yaml").write_text("baseline:\n  epochs: 20\n  alpha: 1.0\n")
    (tmp_path / "reports/verdict.json").write_text(json.dumps(verdict(0.0731)))
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["compare"]).output
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line.strip() and not line.startswith("test")}
    assert rows["baseline.epochs"] == ["20", "6"] and "baseline.alpha" not in rows  # only what differs
    assert rows["mlp/tpe"] == ["7.31", "(-9.19)", "8.22", "(-8.28)"] and rows["mlp/baseline"] == ["16.50", "16.50"]
    assert max(len(line) for line in out.splitlines()) <= 120
    bad = CliRunner().invoke(main, ["compare", "no-such-experiment"])
    assert bad.exit_code == 2 and "neither a git revision nor one DVC experiment" in bad.output
