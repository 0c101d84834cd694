"""`pipeline plan`: counted work as the stages count it, the exact buffer's bytes, the limits'
one-line errors, a scale planned without touching params.yaml, a calibration cache keyed by what
it depends on, and planned time within 2x of a real stage's."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from helpers import tiny_params, tiny_settings
from pipeline import calibration, data, plan
from pipeline.config import parse_params
from pipeline.layout import Outputs

ROOT = Path(__file__).resolve().parents[1]
FAKE = {"grad_s": 0.01, "hvp_s": 0.03, "eval_image_s": 1e-5, "activation_bytes": 1_000_000, "params": 10_000}


@pytest.fixture
def fake_calibration(monkeypatch):
    """Timings without timing: every measurement returns FAKE (and is counted)."""
    calls = []
    monkeypatch.setattr(calibration, "measure", lambda spec, device: calls.append(spec) or dict(FAKE))
    monkeypatch.setattr(calibration, "startup_seconds", lambda: 1.0)
    return calls


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """params.yaml (TINY settings over the shipped file) and scales/ in a scratch directory."""
    settings = tiny_settings(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    shutil.copytree(ROOT / "scales", tmp_path / "scales")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(plan, "stale", lambda root: None)  # no DVC here: every instance
    return tmp_path


def cli(*args):
    from stages.cli import main
    return CliRunner().invoke(main, list(args))


def test_work_counts_equal_what_tiny_stages_record(tmp_path, prepared):
    from pipeline.experiments import adaptive, baseline, drmad
    params = tiny_params(baseline={"epochs": 2}, drmad={"meta_iterations": 2, "epochs_start": 1, "epochs_cap": 2,
                                                        "epochs_growth": 2.0, "reverse_steps": 3},
                         adaptive={"epochs": 6, "variants": {"k": {"every": 2, "window": 3}}})
    planned = plan.instances(params)
    out = Outputs(tmp_path)
    recorded = {"baseline": baseline.run(params, prepared, out.baseline()),
                "drmad@-4.0": drmad.run(params, prepared, -4.0, out.drmad("-4.0")),
                "adaptive@k": adaptive.run(params, prepared, "k", out.adaptive("k"))}
    for name, metrics in recorded.items():
        model, units, bounded = planned[name]
        counted = plan.Instance(name, model, units).work(params.hvp).metrics(params.work.hvp_cost)
        assert not bounded
        for key in ("work_training_gradients", "work_hvps", "work_hypergradient_gradients", "work_gradient_equivalents"):
            assert counted[key] == metrics[key], (name, key)
    assert recorded["adaptive@k"]["work_hvps"] > 0  # the adaptive count was exercised


def test_search_and_final_counts_use_the_stages_functions():
    from pipeline.experiments import search
    params = tiny_params(search={"budget": 100, "trial_epochs": 2})
    cost = search.trial_cost(params, {"sizes": {"train": params.data.train_count}})
    units = plan.instances(params)["search@tpe"][1]
    assert len(units) == 100 // cost and all(u.training == cost for u in units)
    finals = plan.instances(params)["final@drmad"][1]
    assert len(finals) == len(params.drmad.inits) * len(params.final.seeds)


def test_exact_buffer_is_bits_per_step_and_what_exact_reversal_allocates():
    from pipeline.hypergrad import ExactPath, Problem
    from pipeline.hypergrad.bitsback import D, rational_beta
    from pipeline.models import MLP
    p, steps, momentum = 1000, 500, 0.9
    bits = math.log2(D / rational_beta(momentum))  # 0.152 bits per element and step at beta = 0.9
    words = math.ceil((63 + steps * bits) / 16)  # 63: the buffer's starting information
    assert plan.exact_buffer_bytes(p, steps, momentum) == p * (16 + 2 * words)
    torch.manual_seed(0)
    model = MLP((20, 30, 10)).double()
    x, y = torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 10, (64,))
    problem = Problem(model, x, y, x, y, alpha=torch.full((steps,), 0.05, dtype=torch.float64),
                      beta=torch.full((steps,), momentum, dtype=torch.float64), batch_size=16, seed=0)
    buffer = ExactPath.train(problem, problem.l2_coefficients(None)).buffer
    allocated = 2 * buffer.stack.numel() + 8 * (buffer.x.numel() + buffer.top.numel())
    planned = plan.exact_buffer_bytes(problem.numel, steps, momentum)
    # the stack grows ahead of need: two words per element in flight, and up to 2% slack
    assert 0 <= allocated - planned <= 0.02 * planned + 4 * problem.numel


def test_over_memory_is_one_line_naming_the_stage(workspace, fake_calibration, monkeypatch):
    monkeypatch.setattr(plan, "available_memory", lambda: 2 ** 20)  # 1 MiB
    got = cli("plan", "--all")
    assert got.exit_code == 2
    error = [line for line in got.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and error[0].startswith("error: plan: baseline needs ")
    import stages.cli as module
    monkeypatch.setattr(module.subprocess, "call", lambda *a, **k: pytest.fail("dvc repro ran past the plan"))
    got = cli("run")
    assert got.exit_code == 2 and "error: plan:" in got.output


def test_over_disk_is_one_line(workspace, fake_calibration, monkeypatch):
    monkeypatch.setattr(plan.shutil, "disk_usage", lambda root: shutil._ntuple_diskusage(10, 10, 1000))
    got = cli("plan", "--all")
    assert got.exit_code == 2 and "free" in got.output.splitlines()[-1]


def test_scale_paper_is_planned_without_changing_params(workspace, fake_calibration):
    before = (workspace / "params.yaml").read_bytes()
    got = cli("plan", "--scale", "paper")
    assert got.exit_code in (0, 2), got.output
    assert (workspace / "params.yaml").read_bytes() == before
    assert "quality@thesis-200000" in got.output and "scale paper" in got.output
    assert all(len(line) <= 120 for line in got.output.splitlines())
    assert any(s["depth"] == 40 and s["shape"] == [3, 32, 32] for s in fake_calibration if s["model"] == "densenet")


def test_calibration_is_cached_and_keyed_by_batch_size(workspace, fake_calibration):
    params = parse_params(yaml.safe_load((workspace / "params.yaml").read_text()))
    plan.make(params, workspace, everything=True)
    first = len(fake_calibration)
    plan.make(params, workspace, everything=True)
    assert len(fake_calibration) == first  # cached: nothing measured again
    bigger = params.model_copy(update={"baseline": params.baseline.model_copy(update={"batch_size": 48})})
    plan.make(bigger, workspace, everything=True)
    assert len(fake_calibration) == first + 1 and fake_calibration[-1]["batch"] == 48
    assert (workspace / ".cache/plan/calibration.json").is_file()


def test_planned_time_is_within_2x_of_real_stages(tmp_path):
    """DenseNet-10 on 600 digits, long enough that steps, not set-up, dominate: the baseline and a
    DrMAD run (whose reverse pass is most of its time) against their recorded compute seconds."""
    from pipeline.experiments import baseline, drmad
    settings = tiny_settings(model={"depth": 10, "growth_rate": 12, "init_maps": 16},
                             data={"train_size": 640, "val_size": 60, "test_size": 60},
                             baseline={"epochs": 3}, drmad={"meta_iterations": 2, "epochs_start": 1, "epochs_cap": 1,
                                                            "reverse_steps": 30})
    params = parse_params(settings)
    prepared = tmp_path / "prepared"
    data.prepare(params.data, prepared)
    out = Outputs(tmp_path)
    baseline.run(params, prepared, out.baseline())
    drmad.run(params, prepared, -4.0, out.drmad("-4.0"))
    planned = plan.make(params, tmp_path, everything=True)
    ratios = plan.against_actual(planned, tmp_path, {"baseline", "drmad@-4.0"})
    assert set(ratios) == {"baseline", "drmad@-4.0"}
    for name, r in ratios.items():
        assert 0.5 <= r["ratio"] <= 2.0, (name, r)
    json.dumps(ratios)
