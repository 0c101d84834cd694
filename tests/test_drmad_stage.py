"""The drmad stage: sign steps, divergence as an outcome, and resume after SIGKILL."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from pipeline import io
from pipeline.layout import Outputs
from pipeline.experiments import drmad as drmad_tuning
from pipeline.config import load_params, parse_params
from pipeline.hyper import HyperSpace
from pipeline.meta import epochs_at, sign_step, zero_momentum
from pipeline.models import DenseNet
from helpers import tiny_params, tiny_settings

ROOT = Path(__file__).resolve().parents[1]
TINY = tiny_settings(drmad={"inits": [-4.0], "meta_iterations": 3, "epochs_start": 1, "epochs_cap": 2,
                            "batch_size": 32, "reverse_steps": 3},
                     adaptive={"variants": {"k131": {"val_size": None}}})  # the shipped 400 would not fit these splits


def test_sign_step_moves_each_hyperparameter_by_exactly_the_step():
    space = HyperSpace.l2(DenseNet(depth=7, growth_rate=4, init_maps=4, in_channels=1), -4.0, "unit",
                          bounds=(-12.0, 0.0))
    before = {k: v.clone() for k, v in space.values.items()}
    grads = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0), dtype=v.dtype)
             for k, v in space.values.items()}
    first = next(iter(grads))
    grads[first][0] = 0.0
    sign_step(space, grads, zero_momentum(space), step=0.25, mu=0.0)
    for key, value in space.values.items():
        moved = value - before[key]
        assert torch.equal(moved, -0.25 * torch.sign(grads[key]))
    assert space.values[first][0] == before[first][0]


def test_sign_step_follows_the_thesis_momentum_convention():
    """m <- mu m - (1 - mu) sign(g), theta <- theta + eta m (thesis 3.2.1): with mu = 0.7 and
    eta = 1/3 the first step is 0.1 and a steady one tends to 1/3. The heavy-ball form
    (m <- mu m - eta sign) would move 1/3 first and 1.11 in the end; mu = 0.7 keeps mu and 1 - mu apart."""
    space = HyperSpace.create({"w": (3,)}, "log10_l2", -4.0, "parameter", bounds=(-100.0, 100.0))
    momentum, eta, mu = zero_momentum(space), 1 / 3, 0.7
    grads = {"w": torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)}
    moves, before = [], space.values["w"].clone()
    for _ in range(60):
        sign_step(space, grads, momentum, step=eta, mu=mu)
        moves.append(space.values["w"] - before)
        before = space.values["w"].clone()
    by_hand = [eta * (1 - mu), eta * (1 - mu) * (1 + mu), eta * (1 - mu) * (1 + mu + mu ** 2)]
    for move, expected in zip(moves, by_hand):  # 0.1, 0.17, 0.219
        assert torch.allclose(move, torch.tensor([-expected, expected, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(moves[-1], torch.tensor([-eta, eta, 0.0], dtype=torch.float64), atol=1e-9)


def test_sign_step_clips_to_bounds():
    space = HyperSpace.create({"w": (3,)}, "log10_l2", -1.0, "parameter", bounds=(-1.05, -0.95))
    sign_step(space, {"w": torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)}, zero_momentum(space),
              step=0.5, mu=0.0)
    assert space.values["w"].tolist() == [-1.05, -0.95, -1.0]


def test_epochs_grow_to_the_cap():
    assert [epochs_at(i, 100, 1.4, 300) for i in range(5)] == [100, 140, 196, 274, 300]


def test_nan_is_an_outcome_and_the_last_finite_hyperparameters_are_kept(prepared, tmp_path):
    params = tiny_params(TINY, drmad={"alpha": 1e30})
    paths = Outputs(tmp_path).drmad("-4.0")
    metrics = drmad_tuning.run(params, prepared, -4.0, paths)
    assert metrics["outcome"] == "diverged" and metrics["meta_iterations_completed"] == 0
    assert json.loads(paths.metrics.read_text())["outcome"] == "diverged"
    values = torch.load(paths.hypers, weights_only=True)["values"]
    assert all(torch.all(v == -4.0) for v in values.values())
    assert not paths.checkpoint.exists()


@pytest.mark.slow
def test_sigkill_then_dvc_repro_resumes_to_the_uninterrupted_result(prepared, tmp_path):
    """Kill the running stage (SIGKILL) after its first checkpoint; `dvc repro` resumes it."""
    from test_pipeline_e2e import make_repo, sh

    repo = make_repo(tmp_path / "repo", TINY)
    params = load_params(repo / "params.yaml")
    expected = drmad_tuning.run(params, prepared, -4.0, Outputs(tmp_path / "straight").drmad("-4.0"))
    sh(repo, "dvc", "repro", "prepare")
    paths = Outputs(repo).drmad("-4.0")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_", "PIPELINE_"))}
    env.update(PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}", PYTHONPATH=str(repo))
    log = tmp_path / "dvc.log"  # a file, not a pipe: nobody reads while we poll, and a full pipe would block dvc
    with open(log, "w") as out:
        dvc = subprocess.Popen(["dvc", "repro", "drmad@-4.0"], cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while not paths.checkpoint.exists():  # the first meta-iteration is done and saved
        assert dvc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    stage = [p for p in psutil.Process(dvc.pid).children(recursive=True) if "stages.drmad" in " ".join(p.cmdline())]
    assert stage, "the stage process was not found"
    for proc in stage:
        proc.send_signal(signal.SIGKILL)
    assert dvc.wait(timeout=120) != 0  # dvc reports the killed stage as failed
    assert not paths.metrics.exists()
    done = torch.load(paths.checkpoint, weights_only=True)["state"]["iteration"]
    assert 1 <= done < 3

    assert "Running stage 'drmad@-4.0'" in sh(repo, "dvc", "repro", "drmad@-4.0")
    got = json.loads(paths.metrics.read_text())  # results only: the timings went to timings/
    assert got == io.split_timings(expected)[0]
    db = sqlite3.connect(repo / "mlflow.db")
    (killed, status), (resumed, link) = db.execute(
        "select r.run_uuid, r.status from runs r where r.name = 'drmad:-4.0' order by r.start_time").fetchone(), \
        db.execute("select t.run_uuid, t.value from tags t join runs r on r.run_uuid = t.run_uuid "
                   "where r.name = 'drmad:-4.0' and t.key = 'previous_attempt'").fetchone()
    assert status == "KILLED" and link == killed  # the killed attempt is marked, and the resumed run links it
    steps = {s for (s,) in db.execute("select distinct step from metrics where run_uuid = ? and key = "
                                      "'meta/error/test'", (resumed,))}
    assert steps == set(range(done, 3))  # resumed: only the meta-iterations the checkpoint lacked ran
    theirs = torch.load(tmp_path / "straight/results/drmad/-4.0/hypers.pt", weights_only=True)["values"]
    ours = torch.load(paths.hypers, weights_only=True)["values"]
    diffs = {k: (ours[k] - theirs[k]).abs().max().item() for k in theirs if not torch.equal(ours[k], theirs[k])}
    assert not diffs, diffs


def test_counted_work_by_hand(prepared, tmp_path):
    """3 meta-iterations of 1, 1, 2 epochs (x1.4 growth, cap 2) of 3 steps, S = 3 reverse steps each:
    12 training gradients, 3 validation gradients (one per hypergradient), 9 HVPs; a reverse step is
    one HVP (double backward returns its gradient), nothing more."""
    params = parse_params({**TINY, "work": {"hvp_cost": 2.5}})
    metrics = drmad_tuning.run(params, prepared, -4.0, Outputs(tmp_path).drmad("-4.0"))
    assert [epochs_at(i, 1, 1.4, 2) for i in range(3)] == [1, 1, 2]
    assert (metrics["work_training_gradients"], metrics["work_hypergradient_gradients"], metrics["work_hvps"]) == (12, 3, 9)
    assert metrics["work_gradient_equivalents"] == 12 + 3 + 2.5 * 9
    # the same from the run's own rows: T per meta-iteration, S reverse steps at hvp_cost, one gradient each
    rows = pd.read_csv(tmp_path / "plots/drmad/-4.0/meta.csv")
    assert metrics["work_gradient_equivalents"] == sum(rows["training_gradients"]) + sum(1 + 2.5 * rows["reverse_steps"])
    # the declared constant counts; the ratio this machine measured on this model is recorded beside it
    assert metrics["hvp_cost"] == 2.5 and 1.0 < metrics["hvp_cost_measured"] < 20.0


def test_the_finalist_is_the_best_validation_meta_iteration_at_the_longest_training(prepared, tmp_path, monkeypatch):
    """The rule the report states: among the meta-iterations trained longest (epochs grow 1, 1, 2, 2
    to the cap), the lowest validation error, the earliest among equals. Validation errors forced
    to 0.1, 0.5, 0.3, 0.3: the rule picks 2; the best overall would pick 0 (a shorter training), the
    last 3; tune@drmad hands final@drmad the coefficients meta-iteration 2 trained with."""
    import pandas as pd
    from pipeline.experiments import tune
    forced, trainers, real_epoch = [0.1, 0.5, 0.3, 0.3], [], drmad_tuning.train_epoch

    def epoch_with_forced_val(trainer, *args, **kwargs):
        if trainer not in trainers:
            trainers.append(trainer)
        row = real_epoch(trainer, *args, **kwargs)
        return {**row, "val_error": forced[trainers.index(trainer)]}
    monkeypatch.setattr(drmad_tuning, "train_epoch", epoch_with_forced_val)
    params = tiny_params(TINY, drmad={"meta_iterations": 4})
    assert [epochs_at(i, 1, 1.4, 2) for i in range(4)] == [1, 1, 2, 2]
    choice = tune.tune_one(params, prepared, "drmad", "drmad -4", tmp_path)  # what final@drmad retrains
    saved = torch.load(tmp_path / "results/drmad/-4/hypers.pt", weights_only=True)
    assert len(trainers) == 4 and saved["chosen"]["meta_iteration"] == 2 and saved["chosen"]["epochs"] == 2
    assert choice["meta_iteration"] == 2
    layers = pd.read_csv(tmp_path / "plots/drmad/-4/layers.csv").set_index(["meta_iteration", "layer"])["mean"]
    chosen = {n: torch.log10(c / 2).mean().item() for n, c in choice["l2_coefficients"].items()}
    assert chosen == pytest.approx({n: layers[(2, n)] for n in chosen}, abs=1e-9)
    assert chosen != pytest.approx({n: layers[(3, n)] for n in chosen}, abs=1e-9)
