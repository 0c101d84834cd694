"""The quality and paths stages: the five hypergradients agree where theory says they must,
the comparison code is right on hand-made vectors, outputs are valid files, runs resume."""
import json
import math

import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from pipeline import data, inputs
from pipeline import quality_mlp
from pipeline.experiments import quality, trajectory
from pipeline.layout import Outputs
from pipeline.config import parse_params
from pipeline.hypergrad.hvp import double_backward
from helpers import rel

PROTOCOL = {"hidden": [10, 10], "activation": "relu", "biases": "plain", "batch_size": 20, "alpha": 0.3, "momentum": 0.9, "log_l2": -4.0, "l2_base": "10",
            "init_scale": 0.0, "z0_log_scale": None, "pixels": "standardised", "multiplier": 1.0}
TINY = {"device": "cpu",
        "quality": {"data": {"source": "mnist5k", "train_size": 200, "val_size": 100, "test_size": 100},
                    "protocols": {"p": PROTOCOL}, "variants": {"t20": {"protocol": "p", "steps": 20}},
                    "meta_iterations": 2, "drmad_steps": 5, "last": 3, "trace_points": 7,
                    "truncate": [4, "S"], "neumann_terms": [0, 6]},
        "trajectory": {"protocol": "p", "steps": 40, "every": 4, "coordinates": 2}, "arena": {"protocol": "p"}}
PNG = b"\x89PNG\r\n\x1a\n"


def tiny(protocol=None, **quality_overrides):
    protocols = {"p": {**PROTOCOL, **(protocol or {})}}
    return parse_params({**TINY, "quality": {**TINY["quality"], "protocols": protocols, **quality_overrides}})


@pytest.fixture(scope="module")
def splits():
    return data.build(tiny().quality.data)


def five(params, steps, splits):
    built, info = splits
    protocol = params.quality.protocols["p"]
    problem = quality_mlp.build_problem(params.quality, protocol, params.seed, steps, built, info, torch.device("cpu"))
    l2 = quality_mlp.penalty(problem, protocol, torch.device("cpu"))
    return quality.hypergradients(quality.Setup(problem, l2, params.quality, protocol, double_backward))


def compare_direct(params, steps, splits):
    """compare() of the first meta-iteration's hypergradients, computed here without the stage."""
    return {row["method"]: row for row in quality.compare(five(params, steps, splits)["grads"])}


def test_float_reversal_is_exact_to_rounding_for_short_runs_and_drifts_with_t(splits):
    short = five(tiny(), 10, splits)["grads"]
    assert rel(short["float"], short["exact"]) <= 1e-8
    long = five(tiny(), 400, splits)
    assert rel(long["grads"]["float"], long["grads"]["exact"]) > 10 * rel(short["float"], short["exact"])
    w = long["trace"]["w"]  # fig. 3.6: float reversal walks away from the exact one
    assert w[-1] > 100 * w[0]


def test_drmad2_with_k_equal_t_is_float_reversal(splits):
    got = five(tiny(last=30), 30, splits)["grads"]
    assert rel(got["drmad2"], got["float"]) <= 1e-12


def test_drmad_on_a_straight_path_is_exact(splits):
    """One forward step is a straight line: DrMAD with S = T = 1 walks the true path."""
    got = five(tiny(drmad_steps=1), 1, splits)
    assert got["reverse_steps"] == 1
    assert rel(got["grads"]["drmad"], got["grads"]["exact"]) <= 1e-6
    assert rel(got["grads"]["drmad_fixed"], got["grads"]["exact"]) <= 1e-6


def test_compare_on_hand_made_vectors():
    exact = torch.tensor([1.0, 0.0, -2.0, 0.0])
    rows = {r["method"]: r for r in quality.compare({
        "exact": exact, "same": 3 * exact, "opposite": -exact,
        "orthogonal": torch.tensor([0.0, 5.0, 0.0, 0.0]), "half": torch.tensor([1.0, 1.0, 0.0, 0.0])})}
    assert rows["same"]["cos_exact"] == pytest.approx(1.0) and rows["same"]["norm_ratio"] == pytest.approx(3.0)
    assert rows["opposite"]["cos_exact"] == pytest.approx(-1.0) and rows["opposite"]["sign_cos_exact"] == pytest.approx(-1.0)
    assert rows["orthogonal"]["cos_exact"] == 0.0 and rows["orthogonal"]["sign_cos_exact"] == 0.0
    assert rows["half"]["cos_exact"] == pytest.approx(1 / math.sqrt(10))
    assert rows["half"]["sign_cos_exact"] == pytest.approx(1 / 2)  # signs (1,1,0,0) vs (1,0,-1,0)


def test_stage_writes_long_tables_figures_and_metrics(tmp_path):
    paths = Outputs(tmp_path).quality("t20")
    metrics = quality.run(tiny(), "t20", paths)
    assert metrics["outcome"] == "finished" and metrics["meta_iterations_completed"] == 2
    # the stage's wiring (protocol, seed, penalty, multiplier) against a direct call at the same settings
    params = tiny()
    built, info = quality_mlp.load_data(params.quality, params.quality.protocols["p"])
    first = compare_direct(params, 20, (built, info))
    assert metrics["drmad/cos_exact"][0] == pytest.approx(first["drmad"]["cos_exact"], rel=1e-5)
    assert metrics["drmad/norm_ratio"][0] == pytest.approx(first["drmad"]["norm_ratio"], rel=1e-5)
    assert inputs.read_metrics(paths.metrics) == metrics  # results, and timings apart
    # each method's cost: its HVPs (exact and float all T; DrMAD fixed its S; DrMAD2 K + line; truncated K,
    # K = S DrMAD's; implicit N + 1; greedy 1) and its counted work, T + 1 + hvp_cost * HVPs
    assert metrics["exact/hvps"] == metrics["float/hvps"] == [20, 20]
    assert metrics["drmad_fixed/hvps"] == [5, 5] and metrics["drmad/hvps"] == metrics["reverse_steps"]
    assert all(k >= 3 for k in metrics["drmad2/hvps"])  # at least its K = 3 float steps
    assert metrics["truncated_4/hvps"] == [4, 4] and metrics["truncated_S/hvps"] == [min(s, 20) for s in metrics["reverse_steps"]]
    assert metrics["ift_0/hvps"] == [1, 1] and metrics["ift_6/hvps"] == [7, 7] and metrics["greedy/hvps"] == [1, 1]
    assert metrics["ift_6/work"] == pytest.approx([20 + 1 + 2.2 * 7] * 2) and metrics["exact/work"] == pytest.approx([65] * 2)
    assert metrics["methods"] == quality.methods(params.quality)
    assert metrics["hvp_cost"] == 2.2 and metrics["hvp_cost_measured"] > 1
    hyper = pd.read_csv(paths.hypergrads_csv)
    assert list(dict.fromkeys(hyper["method"])) == metrics["methods"] and len(hyper) == 2 * len(metrics["methods"])
    assert hyper[hyper["method"] == "exact"]["norm"].iloc[0] == pytest.approx(first["exact"]["norm"], rel=1e-9)
    reverse = pd.read_csv(paths.reverse_csv)
    assert set(reverse["quantity"]) == set(quality.TRACE) and reverse["steps_back"].max() == 20
    assert len(reverse) == 2 * 7 * len(quality.TRACE)  # thinned to trace_points per meta-iteration
    assert set(pd.read_csv(paths.errors_csv)["split"]) == {"train", "val", "test"}
    names = sorted(p.name for p in paths.figures.iterdir())
    assert names == ["fig3_1_norms.png", "fig3_2_cosines.png", "fig3_3_errors.png", "fig3_4_reverse_norms.png",
                     "fig3_6_drift.png"]
    assert all((paths.figures / n).read_bytes().startswith(PNG) for n in names)
    assert not paths.checkpoint.exists()


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    straight = quality.run(tiny(), "t20", Outputs(tmp_path / "a").quality("t20"))
    paths = Outputs(tmp_path / "b").quality("t20")
    real, calls = quality.meta_iteration, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second meta-iteration
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "meta_iteration", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quality.run(tiny(), "t20", paths)
    assert paths.checkpoint.exists() and not paths.metrics.exists()
    ran = []
    monkeypatch.setattr(quality, "meta_iteration", lambda study, *a, **k: ran.append(study.iteration) or real(study, *a, **k))
    resumed = quality.run(tiny(), "t20", paths)
    assert ran == [1]  # resumed: only the meta-iteration the checkpoint lacked
    timing = ("wall", "time", "floor", "measured")  # wall and CPU time, the op-cost floor timed after the run
    assert {k: v for k, v in resumed.items() if not any(t in k for t in timing)} == \
        {k: v for k, v in straight.items() if not any(t in k for t in timing)}
    assert paths.hypergrads_csv.read_text() == (tmp_path / "a/plots/quality/t20/hypergrads.csv").read_text()


def test_leaving_the_fixed_point_range_is_an_outcome(tmp_path):
    paths = Outputs(tmp_path).quality("t20")
    metrics = quality.run(tiny({"alpha": 1e9}), "t20", paths)
    assert metrics["outcome"] == "diverged" and metrics["meta_iterations_completed"] == 0
    assert json.loads(paths.metrics.read_text())["outcome"] == "diverged"


def test_paths_stage_projections_and_figures(tmp_path):
    paths = Outputs(tmp_path).trajectory()
    metrics = trajectory.run(tiny(), paths)
    assert metrics["iterates_kept"] == 11  # w_0 and every 4th of 40 steps
    # straightness = |w_T - w_0| / path length, by hand from a float run of the same protocol
    params = tiny()
    q = params.quality
    built, info = quality_mlp.load_data(q, q.protocols["p"])
    problem = quality_mlp.build_problem(q, q.protocols["p"], params.seed, 40, built, info, torch.device("cpu"))
    coef = problem.l2_coefficients(quality_mlp.penalty(problem, q.protocols["p"], torch.device("cpu")))
    w, v, kept = problem.w0.clone(), torch.zeros_like(problem.w0), [problem.w0.clone()]
    for t in range(40):
        beta = problem.beta[t].item()
        v = beta * v - (1 - beta) * (problem.train_grad(w, t) + coef * w)
        w = w + problem.alpha[t].item() * v
        if (t + 1) % 4 == 0:
            kept.append(w.clone())
    kept = torch.stack(kept)
    by_hand = ((kept[-1] - kept[0]).norm() / (kept[1:] - kept[:-1]).norm(dim=1).sum()).item()
    assert metrics["straightness"] == pytest.approx(by_hand, rel=1e-5)
    top2 = metrics["pca_explained_top2"]
    assert top2[0] >= top2[1] > 0 and sum(top2) <= 1 + 1e-12
    path = pd.read_csv(paths.path_csv)
    assert set(path["projection"]) == {"random", "pca"} and len(path) == 22
    assert pd.read_csv(paths.coordinates_csv)["coordinate"].nunique() == 2
    assert all(p.read_bytes().startswith(PNG) for p in paths.figures.iterdir())
    assert len(list(paths.figures.iterdir())) == 3


def test_projections_recover_a_straight_line():
    direction = torch.randn(50, dtype=torch.float64)
    iterates = torch.stack([k * direction for k in range(6)])
    frame, explained = trajectory.projections(iterates, list(range(6)), torch.tensor([3, 7]))
    assert explained[0] == pytest.approx(1.0) and explained[1] == pytest.approx(0.0, abs=1e-12)
    random = frame[frame["projection"] == "random"]
    assert random["x"].tolist() == pytest.approx([k * direction[3].item() for k in range(6)])


def test_thesis_protocol_is_the_thesis_to_the_letter():
    """Thesis 3.1 and its scripts (docs/fidelity.md): tanh, step 0.05, momentum 0.95, batch 50,
    e^-4 ||z||^2 (natural log) over every z, z_0 = e^-3 N(0, 1) for weights and biases alike,
    s_0 = 0.2 with the biases' s fixed, centred pixels in [0, 1], S = 1 / (10 gamma)."""
    params = parse_params({})
    thesis = params.quality.protocols["thesis"]
    assert (thesis.alpha, thesis.momentum, thesis.batch_size, thesis.hidden) == (0.05, 0.95, 50, [50, 50, 50])
    assert (thesis.activation, thesis.biases, thesis.pixels, thesis.heuristic) == ("tanh", "scaled", "centred", "text")
    assert 10 ** thesis.log10_l2 == pytest.approx(math.exp(-4), rel=1e-12)
    assert (thesis.init_scale, thesis.z0_log_scale, thesis.multiplier) == (0.2, -3.0, 10.0)
    assert (params.quality.hyper_step, params.quality.hyper_momentum) == (0.07, 0.0)
    assert all(params.quality.meta_iterations_of(r) >= 10 for r in ("thesis-200", "thesis-2000"))
    mlp = quality_mlp.build_mlp(thesis, 0, 784, 10)
    z = torch.cat([t.reshape(-1) for layer in mlp.layers for t in (layer.z, layer.bias_z)])
    assert z.std().item() == pytest.approx(math.exp(-3), rel=0.02) and abs(z.mean().item()) < 1e-3
    biases = torch.cat([layer.bias_z for layer in mlp.layers])
    assert biases.std().item() == pytest.approx(math.exp(-3), rel=0.15)  # drawn, not zero
    assert all(torch.equal(layer.bias_s, torch.full_like(layer.bias_s, 0.2)) for layer in mlp.layers)
    built, info = quality_mlp.load_data(tiny().quality, thesis)
    x = built["train"]["x"]
    assert x.mean(0).abs().max().item() < 1e-6  # centred per pixel on the training split
    assert x.min().item() < -0.5 and x.max().item() > 0.5 and (x.max(0).values - x.min(0).values).max() <= 1.0
    problem = quality_mlp.build_problem(tiny().quality, thesis, 0, 3, built, info, torch.device("cpu"))
    assert problem.alpha.tolist() == [0.05] * 3 and problem.n[0] / 2 ** 16 == pytest.approx(0.95, abs=2 ** -16)
    l2 = quality_mlp.penalty(problem, thesis, torch.device("cpu"))
    assert set(l2.shapes) == set(problem.names)  # every z is penalised, the biases' too
    assert sorted(problem.scales.shapes) == [f"layers.{i}.s" for i in range(4)]  # no bias scale is a hyperparameter


def test_thesis_exact_hypergradient_equals_autograd_through_the_unrolled_training(splits):
    """An independent float64 reference, written out here without the stage's model or Problem:
    the tanh MLP with W = e^s z and b = e^0.2 z_b, centred pixels, loss = mean CE + e^-4 ||z||^2
    over weights and biases, classical momentum at the rational beta the exact run follows, and
    autograd through the unrolled steps. The stage's exact hypergradient of s must match it to
    1e-6; the biases' own s carries a hypergradient that the stage leaves out (fixed at 0.2)."""
    params = tiny({"hidden": [8, 8], "activation": "tanh", "biases": "scaled", "pixels": "centred",
                   "init_scale": 0.2, "z0_log_scale": -3.0, "log_l2": -4.0, "l2_base": "e", "alpha": 0.05,
                   "momentum": 0.95, "batch_size": 50, "multiplier": 10.0})
    protocol, steps = params.quality.protocols["p"], 8
    built, info = quality_mlp.load_data(params.quality, protocol)
    problem = quality_mlp.build_problem(params.quality, protocol, params.seed, steps, built, info, torch.device("cpu"))
    l2 = quality_mlp.penalty(problem, protocol, torch.device("cpu"))
    stage = quality.hypergradients(quality.Setup(problem, l2, params.quality, protocol, double_backward))["grads"]["exact"]

    mlp = quality_mlp.build_mlp(protocol, params.seed, 784, 10).double()
    zs = [t.detach().clone().requires_grad_() for layer in mlp.layers for t in (layer.z, layer.bias_z)]
    s = [torch.full((layer.z.shape[0],), 0.2, dtype=torch.float64, requires_grad=True) for layer in mlp.layers]
    s_bias = [torch.full((layer.z.shape[0],), 0.2, dtype=torch.float64, requires_grad=True) for layer in mlp.layers]
    x, y = built["train"]["x"].flatten(1).double(), built["train"]["y"]
    beta, c = problem.n[0] / 2 ** 16, math.exp(-4)

    def logits(zs, inputs):
        h = inputs
        for i in range(len(s)):
            h = h @ (s[i].exp()[:, None] * zs[2 * i]).T + s_bias[i].exp() * zs[2 * i + 1]
            h = torch.tanh(h) if i < len(s) - 1 else h
        return h

    v = [torch.zeros_like(z) for z in zs]
    for t in range(steps):
        idx = problem.batches.indices(t)
        loss = F.cross_entropy(logits(zs, x[idx]), y[idx]) + c * sum((z ** 2).sum() for z in zs)
        g = torch.autograd.grad(loss, zs, create_graph=True)
        v = [beta * vi - (1 - beta) * gi for vi, gi in zip(v, g)]
        zs = [z + 0.05 * vi for z, vi in zip(zs, v)]
    val = F.cross_entropy(logits(zs, built["val"]["x"].flatten(1).double()), built["val"]["y"])
    grads = torch.autograd.grad(val, s + s_bias)
    reference = torch.cat(grads[: len(s)])
    assert rel(stage, reference) < 1e-6
    assert torch.cat(grads[len(s):]).norm() > 1e-3 * reference.norm()  # a bias hypergradient exists; the stage drops it


def test_the_penalty_base_changes_the_coefficient():
    e, ten = (tiny({"l2_base": base, "log_l2": -4.0}).quality.protocols["p"] for base in ("e", "10"))
    assert 10 ** e.log10_l2 == pytest.approx(math.exp(-4)) and ten.log10_l2 == -4.0


def test_op_floor_counts_every_ops_cost_and_takes_each_ops_faster_reading(monkeypatch):
    """step_costs reads one op's seconds from the clock (a fake one, advanced only by the ops);
    op_floor charges 2T gradients per meta-iteration and one HVP per reverse step of any method,
    at each op's faster reading before or after the run, and records both readings' floors."""
    clock = [0.0]
    monkeypatch.setattr(quality.time, "perf_counter", lambda: clock[0])

    class Timed:  # a problem whose gradient takes 1 ms and whose HVP 3 ms of the fake clock
        steps, w0 = 40, torch.zeros(3)

        def train_grad(self, w, t):
            clock[0] += 1e-3

    def hvp(problem, w, t, dv):
        clock[0] += 3e-3

    grad_s, hvp_s = quality.step_costs(Timed(), hvp, sample=10)
    assert (grad_s, hvp_s) == (pytest.approx(1e-3), pytest.approx(3e-3))
    walked = [{"meta_iteration": i, "method": m, "hvps": s} for i in range(2)
              for m, s in zip(quality.BASE_METHODS, (40, 40, 7, 5, 9))]
    floor = quality.op_floor(40, [(2e-3, 3e-3), (1e-3, 4e-3)], walked, seconds=3.0, cpu_seconds=6.0)
    expected = 2 * 2 * 40 * 1e-3 + 2 * (40 + 40 + 7 + 5 + 9) * 3e-3  # 0.16 s of gradients, 0.606 s of HVPs
    assert floor["floor_time_s"] == round(expected, 1)
    assert floor["floor_time_readings_s"] == [round(0.32 + 0.606, 1), round(0.16 + 2 * 101 * 4e-3, 1)]
    assert floor["wall_over_floor"] == round(3.0 / expected, 3) and floor["cpu_over_floor"] == round(6.0 / expected, 3)
    assert (floor["floor_time_grad_ms"], floor["floor_time_hvp_ms"]) == (1.0, 3.0)
    assert floor["hvp_cost_measured"] == 3.0  # the faster readings' ratio
