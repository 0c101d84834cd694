"""Real `dvc repro` in a temporary git repository with tiny params."""
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "data": {"val_size": 60, "test_size": 60, "train_size": 128},
    "model": {"depth": 7, "growth_rate": 4, "init_maps": 4},
    "baseline": {"epochs": 2, "batch_size": 32},
    "drmad": {"inits": [-4.0], "meta_iterations": 1, "epochs_cap": 1, "batch_size": 32, "reverse_steps": 2},
    "adaptive": {"variants": {"k100": {"every": 2, "window": 2}, "k131": {"every": 3, "window": 2, "val_size": 50}},
                 "epochs": 1, "batch_size": 32, "val_batch_size": 20},
    "quality": {"data": {"train_size": 200, "val_size": 100, "test_size": 100},
                "protocols": {"tiny": {"hidden": [8], "batch_size": 20, "alpha": 0.05, "momentum": 0.95}},
                "variants": {"tiny-10": {"protocol": "tiny", "steps": 10}, "tiny-20": {"protocol": "tiny", "steps": 20}},
                "meta_iterations": 1, "drmad_steps": 3, "last": 3, "trace_points": 5},
    "trajectory": {"protocol": "tiny", "steps": 20, "every": 5},
    "search": {"trial_epochs": 1},  # budget: drmad's counted work, 9.4 gradient evaluations -> 2 trials of 4
    "final": {"seeds": [1, 2]},
    "arena": {"protocol": "tiny", "seeds": [0, 1], "steps": 10, "budget": 60, "rungs": 2},
}
REPLACED = ("protocols", "variants")  # mappings the tiny params replace whole (merging would keep the defaults')
DENSENET_STAGES = ("prepare", "baseline", "drmad@-4.0", "adaptive@k100", "adaptive@k131", "search@random",
                   "search@random-step", "search@tpe-step",
                   "search@tpe", "tune@search", "tune@drmad", "final@baseline", "final@search", "final@drmad",
                   "final@adaptive")
METHODS = ("baseline", "random", "tpe", "random-step", "tpe-step", "drmad -4", "adaptive k100", "adaptive k131", "adaptive k100 baseline-schedule",
           "adaptive k131 baseline-schedule")
ARENA_METHODS = ("baseline", "drmad", "drmad2", "exact", "truncated", "greedy", "random", "tpe", "hyperband")
STAGES = ("validate",) + DENSENET_STAGES + ("arena@0", "arena@1", "quality@tiny-10", "quality@tiny-20", "trajectory", "report")
pytestmark = pytest.mark.slow


def deep_update(node: dict, change: dict) -> None:
    for key, value in change.items():
        if isinstance(value, dict) and key not in REPLACED:
            deep_update(node[key], value)
        else:
            node[key] = value


def set_params(repo: Path, change: dict) -> None:
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    deep_update(raw, change)
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def sh(repo: Path, *cmd: str, ok: bool = True) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PIPELINE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(repo),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == ok, f"{cmd}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def outputs(repo: Path) -> dict[str, bytes]:
    """Every file the pipeline wrote or tracks (not git's, DVC's internals, MLflow's or params.yaml)."""
    skip = (".git", ".dvc", "mlflow.db", "mlruns", "params.yaml", "checkpoints", "__pycache__")
    return {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
            if p.is_file() and not p.relative_to(repo).parts[0].startswith(skip)}


def ran(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


def stale(repo: Path) -> set[str]:
    """Stages whose own dependencies changed (`dvc status`): what the next repro starts from."""
    return set(json.loads(sh(repo, "dvc", "status", "--json").strip().splitlines()[-1] or "{}"))


def make_repo(repo: Path, params: dict = TINY) -> Path:
    """A git + DVC repository holding the project with `params` applied to params.yaml."""
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    shutil.copytree(ROOT / ".dvc/plots", repo / ".dvc/plots")  # the offline plots page, as the project ships it
    sh(repo, "dvc", "config", "plots.html_template", "plots/offline.html")
    set_params(repo, params)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "tiny pipeline")
    return repo


def test_repro_runs_what_changed_and_records_it(tmp_path):
    repo = make_repo(tmp_path)
    assert ran(sh(repo, sys.executable, "-m", "stages.cli", "run")) == set(STAGES)
    for out in ("data/prepared/train.pt", "data/prepared/info.json", "models/baseline.pt",
                "metrics/baseline.json", "plots/baseline/errors.csv", "results/drmad/-4.0/hypers.pt",
                "metrics/drmad/-4.0.json", "plots/drmad/-4.0/meta.csv", "plots/drmad/-4.0/layers.csv",
                "metrics/adaptive/k100.json", "plots/adaptive/k131/epochs.csv", "results/adaptive/k131/hypers.pt"):
        assert (repo / out).exists(), out
    for out in ("metrics/quality/tiny-20.json", "plots/quality/tiny-10/hypergrads.csv",
                "figures/quality/tiny-20/fig3_6_drift.png",
                "figures/trajectory/fig2_2_pca.png", "reports/summary.csv", "reports/figures/test_error_per_epoch.png"):
        assert (repo / out).exists(), out
    summary = (repo / "reports/summary.md").read_text()
    for row in ("| baseline |", "| drmad -4.0 |", "| adaptive k100 |", "| adaptive k131 |", "| 10 | tiny | drmad |",
                "| 20 | tiny | drmad2 |"):
        assert row in summary, row
    # The verdict leads: every method's row, with a finite interval over the two seeds.
    assert summary.startswith("# Verdict")
    lead = summary.split("# Tuning runs")[0]
    for arena, methods in (("DenseNet", METHODS), ("MLP", ARENA_METHODS)):
        section = lead.split(f"## {arena} arena")[1].split("\n## ")[0].split("Every method against")[0]
        verdict_rows = {line.split(" | ")[0].removeprefix("| "): line for line in section.splitlines()
                        if line.startswith("| ") and " [" in line}
        assert set(verdict_rows) == set(methods), arena
        for method, line in verdict_rows.items():
            assert re.search(r"\| 2 \| \d+\.\d\d \[-?\d+\.\d\d, \d+\.\d\d\] \|", line), line
            assert method == "baseline" or re.search(r"\| (better|worse|equivalent|inconclusive)", line), line
    assert "**densenet arena, 2 seeds** — " in lead and "**mlp arena, 2 seeds** — " in lead
    verdict = json.loads((repo / "reports/verdict.json").read_text())
    assert set(verdict) == {"densenet", "mlp"} and set(verdict["mlp"]) == set(ARENA_METHODS)
    verdict = verdict["densenet"]
    assert set(verdict) == set(METHODS) and verdict["baseline"]["tuning_work"] == 0
    assert verdict["random"]["tuning_work"] == verdict["tpe"]["tuning_work"] == 8  # two trials of 4 steps
    assert verdict["random-step"]["tuning_work"] == verdict["tpe-step"]["tuning_work"] == 8
    for cache in repo.rglob("__pycache__"):  # a fresh clone has no bytecode: it must not look like changed code
        shutil.rmtree(cache)
    assert ran(sh(repo, "dvc", "repro")) == set()
    shown = sh(repo, "dvc", "metrics", "show")
    assert "baseline.json" in shown and "reports/verdict.json" in shown and "test_error_mean" in shown
    assert "wall_time_s" not in shown and "platform" not in shown  # results only: timings/ holds those
    assert "wall_time_s" in json.loads((repo / "timings/baseline.json").read_text())

    # A rejected params.yaml under plain `dvc repro`: non-zero exit, the key named, nothing lost.
    before, good = outputs(repo), (repo / "params.yaml").read_text()
    set_params(repo, {"baseline": {"epochs": -3}})
    assert "baseline.epochs: must be >= 1" in sh(repo, "dvc", "repro", ok=False)
    assert outputs(repo) == before
    (repo / "params.yaml").write_text(good)
    assert ran(sh(repo, "dvc", "repro")) == set()  # the failed attempt recorded nothing: all still current

    db = sqlite3.connect(repo / "mlflow.db")
    runs = dict(db.execute("select name, status from runs").fetchall())
    assert runs["prepare"] == runs["baseline"] == runs["drmad:-4.0"] == runs["adaptive:k131"] == "FINISHED"
    assert runs["quality:tiny-10"] == runs["trajectory"] == runs["report"] == "FINISHED"
    parents = db.execute("select count(*) from runs where name like 'pipeline%'").fetchone()[0]
    assert parents == 1  # all stage runs grouped under one parent
    baseline_id = db.execute("select run_uuid from runs where name = 'baseline'").fetchone()[0]
    epochs = db.execute("select count(*) from metrics where key = 'error/test' and run_uuid = ?",
                        (baseline_id,)).fetchone()[0]
    assert epochs == TINY["baseline"]["epochs"]
    # A handful of hyperparameter curves per run (quantiles), not one per layer; one key, one meaning.
    keys = {name: {k for (k,) in db.execute("select distinct m.key from metrics m join runs r on r.run_uuid = "
                                             "m.run_uuid where r.name = ?", (name,))}
            for name in ("drmad:-4.0", "adaptive:k100")}
    assert {"hyper/log10_l2/median", "hyper/log10_l2/p95", "meta/error/val"} <= keys["drmad:-4.0"]
    assert {"hyper/log10_lr/median", "error/val"} <= keys["adaptive:k100"]
    assert not [k for ks in keys.values() for k in ks if ".weight" in k]  # no per-layer keys
    assert "error/val" not in keys["drmad:-4.0"]  # separate trainings' epochs are not joined into one curve

    # Changing one value reruns exactly the stages that depend on it.
    parent = db.execute("select run_uuid from runs where name like 'pipeline%'").fetchone()[0]
    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    assert "summary.md" in {Path(f.path).name for f in client.list_artifacts(parent, "report")}
    parent_metrics = client.get_run(parent).data.metrics
    assert {f"verdict/densenet/{m}/test_error_mean" for m in METHODS} <= set(parent_metrics)
    assert {f"verdict/mlp/{m}/test_error_mean" for m in ARENA_METHODS} <= set(parent_metrics)
    trials = client.search_runs([client.get_run(parent).info.experiment_id], "attributes.run_name LIKE 'trial %'")
    searches = {r.info.run_id: r.info.run_name for r in client.search_runs(
        [client.get_run(parent).info.experiment_id], "attributes.run_name LIKE 'search:%'")}
    assert sorted(searches[t.data.tags["mlflow.parentRunId"]] for t in trials) == \
        sorted(f"search:{name}" for name in ("random", "tpe", "random-step", "tpe-step") for _ in range(2))

    # Changing one value reruns exactly the stages that depend on it, and the report.
    # (`validate` reruns on any params change; its constant stamp reruns nothing by itself)
    set_params(repo, {"baseline": {"epochs": 3}})  # the peers train and the finalists retrain at the baseline's
    assert stale(repo) == {"validate", "baseline", "search@random", "search@tpe", "search@random-step", "search@tpe-step",
                           "tune@search", "final@baseline", "final@search",
                           "final@drmad", "final@adaptive"}  # (the report follows from their outputs)
    set_params(repo, {"baseline": {"epochs": TINY["baseline"]["epochs"]}})
    set_params(repo, {"data": {"val_size": 50}})  # every DenseNet stage follows from prepare's outputs
    assert stale(repo) == {"validate", "prepare"}
    set_params(repo, {"data": {"val_size": TINY["data"]["val_size"]}})
    assert stale(repo) == set()
    set_params(repo, {"adaptive": {"variants": {"k131": {"every": 4}}}})
    assert ran(sh(repo, "dvc", "repro")) == {"validate", "adaptive@k131", "final@adaptive", "report"}
    set_params(repo, {"final": {"seeds": [1, 3]}})
    assert stale(repo) == {"validate", "tune@search", "tune@drmad", "final@baseline", "final@search", "final@drmad",
                           "final@adaptive"}  # each seed tunes again
    set_params(repo, {"final": {"seeds": TINY["final"]["seeds"]}, "quality": {"drmad_steps": 4}})
    assert stale(repo) == {"validate", "quality@tiny-10", "quality@tiny-20"}
    set_params(repo, {"quality": {"drmad_steps": TINY["quality"]["drmad_steps"]}})
    raw = yaml.safe_load((repo / "params.yaml").read_text())  # a protocol and a run added beside the others
    raw["quality"]["protocols"]["other"] = {"hidden": [8], "batch_size": 10}
    raw["quality"]["variants"]["other-10"] = {"protocol": "other", "steps": 10}
    (repo / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    out = sh(repo, "dvc", "repro")
    assert ran(out) == {"validate", "report"} and "Running stage 'quality@other-10'" in out  # only the new run
    # A DVC remote: push from this clone, pull in another, and nothing is left to run there.
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results")
    sh(repo, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(repo, "dvc", "push")
    sh(tmp_path, "git", "clone", "-q", str(repo), "clone")
    clone = tmp_path / "clone"
    sh(clone, "dvc", "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    sh(clone, "dvc", "pull")
    assert "up to date" in sh(clone, "dvc", "status") and ran(sh(clone, "dvc", "repro")) == set()
    assert (clone / "models/baseline.pt").read_bytes() == (repo / "models/baseline.pt").read_bytes()

    sh(repo, "dvc", "plots", "show", "-o", "dvc_plots")
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "vegaEmbed" in page  # renders offline: Vega is inlined
    for plot in ("baseline_errors", "drmad_meta_errors", "search_trials", "test_error_vs_compute"):
        assert plot in page, plot
