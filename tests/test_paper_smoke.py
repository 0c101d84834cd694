"""The paper scale, exercised: `pipeline scale paper` exactly as it writes params.yaml, with only
lengths and data sizes shrunk (pipeline.scale.smoke), on fake CIFAR-10 and MNIST in torchvision's
on-disk formats, every stage through `dvc repro` in a temporary git repository to the report.

The run is marked `paper`: deselected unless asked for (`pytest -m paper`, `make paper-smoke`), it
takes tens of minutes on 2 CPU cores (DenseNet-40 at one batch of 64 an epoch). The other tests
here are fast and keep the shrunk settings the paper's (docs/scaling.md)."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fake_datasets import write_cifar10, write_mnist
from pipeline import scale
from pipeline.config import load_params, parse_params, read_yaml

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(__file__).resolve().parent / "paper_site"  # sitecustomize: fake CIFAR-10 passes torchvision's md5 check


def sh(repo: Path, *cmd: str, ok: bool = True, timeout: float = 3600, code: Path | None = None) -> str:
    """`cmd` in `repo`, importing the project from `code` (default: `repo` itself) and the md5 patch."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PIPELINE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=f"{SITE}:{code or repo}",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@localhost", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@localhost")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert (proc.returncode == 0) == ok, f"{cmd}\n{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}"
    return proc.stdout + proc.stderr


def make_paper_repo(repo: Path) -> Path:
    """A git + DVC repository holding the project, `pipeline scale paper` applied, then shrunk by
    `scale.smoke`, with the fake datasets under data/raw; committed."""
    repo.mkdir(parents=True, exist_ok=True)
    for item in ("pipeline", "stages", "scales", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    sh(repo, "git", "init", "-q")
    sh(repo, "dvc", "init", "-q")
    sh(repo, "dvc", "config", "core.analytics", "false")
    sh(repo, sys.executable, "-m", "stages.cli", "scale", "paper")
    paper = read_yaml((repo / "params.yaml").read_text())
    (repo / "params.yaml").write_text(yaml.safe_dump(scale.smoke(paper), sort_keys=False))
    settings = load_params(repo / "params.yaml")
    (train, test), (mnist_train, mnist_test) = scale.SMOKE_DATA["cifar10"], scale.SMOKE_DATA["mnist"]
    write_cifar10(repo / settings.data.root, train, test)
    write_mnist(repo / settings.quality.data.root, mnist_train, mnist_test)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "paper scale, shrunk")
    return repo


@pytest.fixture(scope="module")
def paper_settings(tmp_path_factory) -> dict:
    """params.yaml as `pipeline scale paper` writes it (the library call behind the command)."""
    where = tmp_path_factory.mktemp("paper")
    shutil.copytree(ROOT / "scales", where / "scales")
    shutil.copy(ROOT / "params.yaml", where / "params.yaml")
    return scale.apply("paper", where / "params.yaml", where)


def leaves(node, prefix: str = "") -> dict[str, object]:
    """{'a.b.c': value} of every leaf of nested mappings (lists are leaves)."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def changed(paper: dict, smoke: dict) -> dict[str, tuple]:
    """Every setting, defaults included, whose validated value differs: {key: (paper, smoke)}."""
    a, b = (leaves(parse_params(s).model_dump()) for s in (paper, smoke))
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def is_length(key: str) -> bool:
    """Is `key` (or a mapping above it) one of scale.SMOKE_LENGTHS, `*` standing for one part?"""
    parts = key.split(".")
    return any(len(parts) >= len(pattern) and all(map(fnmatch.fnmatchcase, parts, pattern))
               for pattern in (p.split(".") for p in scale.SMOKE_LENGTHS))


def test_smoke_changes_only_lengths_and_data_sizes(paper_settings):
    smoke = scale.smoke(paper_settings)
    diff = changed(paper_settings, smoke)
    assert diff and not [k for k in diff if not is_length(k)], [k for k in diff if not is_length(k)]
    for key, (before, after) in diff.items():  # shrunk, never grown
        if isinstance(before, (int, float)) and isinstance(after, (int, float)):
            assert after <= before, key
        elif isinstance(before, list):
            assert len(after) <= len(before) and all(x == y if isinstance(x, str) else x <= y
                                                     for x, y in zip(after, before)), key
    assert parse_params(smoke) and smoke is not paper_settings and scale.smoke(paper_settings) == smoke


def test_smoke_keeps_the_papers_model_data_schedules_and_optimiser(paper_settings):
    p, s = parse_params(paper_settings), parse_params(scale.smoke(paper_settings))
    assert s.model == p.model and (s.model.depth, s.model.growth_rate, s.model.dropout) == (40, 12, 0.2)
    assert (s.data.source, s.data.download, s.data.train_size, s.data.test_size) == ("cifar10", True, None, None)
    assert (s.quality.data.source, s.quality.data.download) == ("mnist", True)
    for section in ("baseline", "drmad", "adaptive"):
        mine, theirs = getattr(s, section), getattr(p, section)
        assert (mine.batch_size, mine.alpha, mine.schedule) == (theirs.batch_size, theirs.alpha, theirs.schedule), section
    assert (s.baseline.momentum, s.drmad.momentum, s.drmad.hyper_step, s.drmad.hyper_momentum) == \
        (p.baseline.momentum, p.drmad.momentum, p.drmad.hyper_step, p.drmad.hyper_momentum)
    assert s.baseline.nesterov and s.baseline.schedule.milestones == s.drmad.schedule.milestones == [0.5, 0.75]
    assert s.drmad.epochs_growth == 1.4 and s.drmad.inits == [-4.0, -2.0, -7.0] and s.work.hvp_cost == 3.5
    assert s.adaptive.schedule.milestones == [] and s.adaptive.floor_schedule.milestones == [0.5, 0.75]
    assert (s.adaptive.val_batches, s.adaptive.val_batch_size) == ("window", 64)
    assert {k: (v.momentum, v.l2_step, v.lr_step) for k, v in s.adaptive.variants.items()} == \
        {"k100": (0.9, 0.01, 0.2), "k131": (0.95, 0.02, 0.1)}
    assert s.quality.protocols == p.quality.protocols and set(s.quality.variants) == set(p.quality.variants) >= \
        {"thesis-200", "thesis-2000", "thesis-20000", "thesis-200000"}
    steps = [s.quality.variants[f"thesis-{t}"].steps for t in (200, 2000, 20000, 200000)]
    assert steps == sorted(set(steps)) and steps[0] >= 20  # the T list, shrunk, still rising
    assert s.search.samplers == p.search.samplers and s.search.space == p.search.space
    # The shrunk lengths still reach what they stand for: the epoch growth, the adaptive updates.
    assert [s.drmad.start_epochs(i) for i in s.drmad.inits] == [2, 1, 1]
    assert [min(s.drmad.epochs_cap, round(2 * 1.4 ** i)) for i in range(s.drmad.meta_iterations)] == [2, 3]
    for v in s.adaptive.variants.values():
        assert v.every <= s.baseline.epochs and v.window <= v.every and v.val_size
    pool, test = scale.SMOKE_DATA["cifar10"]
    assert pool - s.data.val_size == s.baseline.batch_size  # one batch an epoch


def test_the_md5_patch_is_inside_its_folder_only():
    """Outside the smoke test's processes torchvision's check is the real one."""
    import torchvision.datasets.cifar as cifar
    assert cifar.check_integrity.__module__ == "torchvision.datasets.utils"


@pytest.mark.paper
def test_paper_scale_shrunk_runs_every_stage_to_the_report(tmp_path):
    repo = make_paper_repo(tmp_path / "repo")
    settings = load_params(repo / "params.yaml")
    start = time.perf_counter()
    out = sh(repo, sys.executable, "-m", "stages.cli", "run")
    print(f"paper smoke: dvc repro of every stage took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    check_outputs(repo, settings, out)


def check_outputs(repo: Path, settings, out: str) -> None:
    """What the shrunk paper run must have left: every stage run once, CIFAR-10 read by torchvision
    and split as the paper's settings say, DenseNet-40, DrMAD's epochs growing, the adaptive
    variants' hyper-updates, every quality run, the report."""
    stages = ["validate", "prepare", "baseline", "trajectory", "report",
              *(f"drmad@{i}" for i in settings.drmad.inits), *(f"adaptive@{v}" for v in settings.adaptive.variants),
              *(f"search@{s}" for s in settings.search.samplers), "tune@search", "tune@drmad",
              *(f"final@{k}" for k in ("baseline", "search", "drmad", "adaptive")),
              *(f"arena@{s}" for s in settings.arena.seeds), *(f"quality@{r}" for r in settings.quality.variants)]
    assert [s for s in stages if f"Running stage '{s}'" not in out] == []
    assert "up to date" in sh(repo, "dvc", "status")
    assert not [p for p in (repo / "data/raw").rglob("*") if p.suffix in (".gz", ".tgz")]  # nothing downloaded

    # CIFAR-10 as torchvision read it, split as the paper's settings say: the rest of the pool, the own test split.
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    pool, test = scale.SMOKE_DATA["cifar10"]
    assert (meta["source"], meta["channels"], meta["height"], meta["width"]) == ("cifar10", 3, 32, 32)
    assert meta["sizes"] == {"train": pool - settings.data.val_size, "val": settings.data.val_size, "test": test}
    weights = torch.load(repo / "models/baseline.pt", weights_only=True)["model"]  # DenseNet-40, k = 12
    assert sum(t.numel() for k, t in weights.items() if "running" not in k and "num_batches" not in k) == 1_019_722

    # DrMAD's epochs grow from each init's start to the cap; every adaptive variant updated once.
    for init, epochs in ((-4.0, [2, 3]), (-2.0, [1, 1]), (-7.0, [1, 1])):
        m = json.loads((repo / f"metrics/drmad/{init}.json").read_text())
        assert (m["outcome"], m["reverse_steps"]) == ("finished", [1, 1]), init
        rows = (repo / f"plots/drmad/{init}/meta.csv").read_text().splitlines()
        assert [int(r.split(",")[1]) for r in rows[1:]] == epochs, init
    for name in settings.adaptive.variants:
        m = json.loads((repo / f"metrics/adaptive/{name}.json").read_text())
        assert (m["outcome"], m["hyper_updates"], m["epochs_completed"]) == ("finished", 1, 2), name
    q = settings.quality.data
    for run, cfg in settings.quality.variants.items():
        m = json.loads((repo / f"metrics/quality/{run}.json").read_text())
        assert (m["outcome"], m["forward_steps"], m["data"]) == ("finished", cfg.steps, f"mnist {q.train_size}/{q.val_size}/{q.test_size}"), run
        assert m["meta_iterations_completed"] == settings.quality.meta_iterations_of(run), run

    summary = (repo / "reports/summary.md").read_text()
    assert summary.startswith("# Verdict") and "**densenet arena, 2 seeds**" in summary
    verdict = json.loads((repo / "reports/verdict.json").read_text())
    assert set(verdict) == {"densenet", "mlp"} and "drmad -4" in verdict["densenet"]


def test_fake_datasets_load_through_torchvision_and_nothing_downloads(tmp_path):
    """In a process started as the smoke test starts its stages, the real loaders read the fake
    folders with the paper's data.download: true, and a download attempt is an error."""
    write_cifar10(tmp_path / "raw", 20, 10)
    write_mnist(tmp_path / "raw", 30, 10)
    script = f"""
import sys, torchvision.datasets.utils as u
from pipeline import data
from pipeline.config import DataConfig
meta = data.prepare(DataConfig(source="cifar10", root="raw", download=True, val_size=5), "cifar")
assert meta["sizes"] == {{"train": 15, "val": 5, "test": 10}} and meta["channels"] == 3, meta
meta = data.prepare(DataConfig(source="mnist", root="raw", download=True, val_size=5), "mnist")
assert meta["sizes"] == {{"train": 25, "val": 5, "test": 10}} and meta["height"] == 28, meta
try:
    u.download_url("https://example.invalid/x", ".")
except RuntimeError as exc:
    print("refused:", exc)
"""
    out = sh(tmp_path, sys.executable, "-c", script, code=ROOT)
    assert "refused: torchvision tried to download" in out
    (tmp_path / "raw/cifar-10-batches-py/test_batch").unlink()  # a missing file still fails, as it must
    failed = sh(tmp_path, sys.executable, "-c", "from pipeline import data\nfrom pipeline.config import DataConfig\n"
                "data.prepare(DataConfig(source='cifar10', root='raw', val_size=5), 'c')", ok=False, code=ROOT)
    assert "CIFAR-10 under raw/cifar-10-batches-py could not be loaded" in failed
