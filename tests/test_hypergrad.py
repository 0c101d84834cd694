"""Hypergradients against independent references (float64, CPU).

`unrolled` is plain autograd through the stored training graph; finite differences probe
the seeded training + validation loss. Both share the problem's rational momenta n / 2^16.
"""
import math

import pytest
import torch
from torch.nn import functional as F

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import (ExactPath, FixedPointOverflow, FloatPath, Problem, ReversalError, hypergradient,
                                log_lr_hypergradient, validation_loss)
from pipeline.hypergrad.hvp import HVP_METHODS, double_backward, forward_over_reverse
from pipeline.hypergrad.reverse import all_finite, reversal_drift, reverse
from pipeline.models import MLP, DenseNet, MaskedDropout
from helpers import rel

F64 = torch.float64


def make_problem(kind="mlp", steps=50, beta=0.9, alpha=0.3, seed=0, n=64, batch=16, dtype=F64):
    torch.manual_seed(seed)
    if kind == "mlp":
        model, shape = MLP((12, 10, 10, 4)).to(dtype), (12,)
    else:
        model, shape = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1).to(dtype), (1, 8, 8)
    classes = 4 if kind == "mlp" else 10
    x, vx = torch.randn(n, *shape, dtype=dtype), torch.randn(32, *shape, dtype=dtype)
    y, vy = torch.randint(0, classes, (n,)), torch.randint(0, classes, (32,))
    betas = beta if isinstance(beta, torch.Tensor) else torch.full((steps,), beta)
    alphas = alpha if isinstance(alpha, torch.Tensor) else torch.full((steps,), alpha)
    return Problem(model, x, y, vx, vy, alpha=alphas, beta=betas, batch_size=batch, seed=seed)


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


# -- exact reversal -----------------------------------------------------------------------------

def undo_all(problem, path, coef):
    for t in reversed(range(problem.steps)):
        path.undo_position(t)
        w = path.w()
        path.undo_velocity(t, problem.train_grad(w, t) + coef * w)


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.95, 0.99, "schedule"])
def test_reversal_recovers_w0_and_v_bit_for_bit_after_10000_steps(beta):
    steps = 10_000
    if beta == "schedule":
        beta = torch.linspace(0.5, 0.99, steps)
    torch.manual_seed(1)
    problem = Problem(MLP((6, 5, 3)).to(F64), torch.randn(32, 6, dtype=F64), torch.randint(0, 3, (32,)),
                      torch.randn(8, 6, dtype=F64), torch.randint(0, 3, (8,)),
                      alpha=torch.full((steps,), 0.5), beta=beta if isinstance(beta, torch.Tensor)
                      else torch.full((steps,), beta), batch_size=4, seed=0)
    coef = problem.l2_coefficients(HyperSpace.l2(problem.model, -3.0, "parameter"))
    path = ExactPath.train(problem, coef)
    w0 = ExactPath(problem).w_int
    start = ExactPath(problem).buffer
    assert not torch.equal(path.w_int, w0)
    undo_all(problem, path, coef)
    assert torch.equal(path.w_int, w0)
    assert torch.equal(path.v_int, torch.zeros_like(path.v_int))
    assert torch.equal(path.buffer.x, start.x) and torch.equal(path.buffer.top, start.top)


def at_start(problem, path):
    """Is the exact path back at w_0, v = 0 and the empty buffer, bit for bit? (independent of
    the path's own round-trip check)"""
    fresh = ExactPath(problem)
    return (torch.equal(path.w_int, fresh.w_int) and not path.v_int.any()
            and torch.equal(path.buffer.x, fresh.buffer.x) and torch.equal(path.buffer.top, fresh.buffer.top))


@pytest.mark.parametrize("kind", ["mlp", "densenet"])
@pytest.mark.parametrize("hvp", list(HVP_METHODS))
def test_exact_with_each_hvp_is_bit_exact_and_matches_unrolled_at_300_steps(kind, hvp):
    """Whatever computes the Hessian product, the reverse pass must undo the very steps training
    took (DenseNet: BatchNorm on batch statistics and seeded dropout masks)."""
    problem = make_problem(kind, steps=300, alpha=0.3 if kind == "mlp" else 0.1)
    l2 = HyperSpace.l2(problem.model, -2.0, "layer")
    path = ExactPath.train(problem, problem.l2_coefficients(l2))
    got = reverse(problem, path, l2, HVP_METHODS[hvp])
    assert at_start(problem, path)
    reference = hypergradient(problem, l2, "unrolled")
    assert rel(flat(got["log10_l2"]), flat(reference["log10_l2"])) <= 1e-6
    for key in ("alpha", "beta", "w0"):
        assert rel(got[key], reference[key]) <= 1e-6, key


def test_a_corrupted_buffer_word_is_an_error_not_a_hypergradient():
    problem = make_problem(steps=400)  # 0.152 bits a step at beta = 0.9: a few words each
    path = ExactPath.train(problem, problem.l2_coefficients(None))
    assert bool((path.buffer.top > 3).all())  # every element has spilled words of its own
    path.buffer.stack[2, 7] ^= 1  # one bit of element 7's first spilled word
    with pytest.raises(ReversalError, match="did not return to the start"):
        reverse(problem, path, None, double_backward)


def test_a_reverse_gradient_unlike_the_forward_ones_is_an_error(monkeypatch):
    """The failure of old: forward-over-reverse's gradient differed from training's in the last
    bits, the reversal left the trajectory, and a wrong hypergradient came back silently."""
    problem = make_problem(steps=30)
    path = ExactPath.train(problem, problem.l2_coefficients(None))
    train_grad = problem.train_grad
    monkeypatch.setattr(problem, "train_grad", lambda w, t: train_grad(w, t) + 1e-9)
    with pytest.raises(ReversalError, match="no hypergradient"):
        reverse(problem, path, None, forward_over_reverse)  # the reverse pass's own train_grad


def test_a_reverse_gradient_from_the_product_unlike_the_forward_ones_is_an_error():
    """Double backward hands its gradient to the reverse step: one off in the last bits is caught."""
    problem = make_problem(steps=30)
    path = ExactPath.train(problem, problem.l2_coefficients(None))

    def off(problem, w, t, dv):
        hdv, mixed, g = double_backward(problem, w, t, dv)
        return hdv, mixed, g + 1e-9

    with pytest.raises(ReversalError, match="no hypergradient"):
        reverse(problem, path, None, off)


def test_all_finite_is_isfinite_all():
    """Float reversal's per-step check that it is still finite (`Walk`): any inf or NaN, however
    placed, is caught; the largest floats are not mistaken for one."""
    x = torch.randn(1000, dtype=F64)
    assert all_finite(x) and all_finite(torch.full((1000,), torch.finfo(F64).max, dtype=F64))
    for bad in (math.inf, -math.inf, math.nan):
        for at in (0, 517, 999):
            y = x.clone()
            y[at] = bad
            assert not all_finite(y), (bad, at)


def test_float_reversal_drifts_where_exact_does_not():
    """Thesis fig. 3.6: plain float reversal loses log2(1/beta) bits a step."""
    drift = {}
    for steps in (10, 400):
        problem = make_problem(steps=steps, beta=0.9)
        coef = problem.l2_coefficients(None)
        path = FloatPath.train(problem, coef)
        undo_all(problem, path, coef)
        drift[steps] = rel(path.w(), problem.w0)
        exact = ExactPath.train(problem, coef)  # the same run in exact arithmetic, undone the same way
        undo_all(problem, exact, coef)
        assert at_start(problem, exact)
    assert drift[10] < 1e-12
    assert drift[400] > 1e3 * drift[10] and drift[400] > 1e-8, drift


def test_reversal_drift_records_fig_3_6_distances():
    problem = make_problem(steps=300, beta=0.9)
    l2 = HyperSpace.l2(problem.model, -2.0, "unit")
    exact = ExactPath.train(problem, problem.l2_coefficients(l2))
    plain = FloatPath(problem, exact.w(), exact.v())  # the same endpoint, undone in floats
    drift = reversal_drift(problem, exact, plain, l2, double_backward)
    assert drift["step"][0] == 299 and drift["step"][-1] == 0
    assert drift["w"][0] < 1e-10  # one float step back: apart only by the fixed-point grid
    assert drift["cos_d_theta"][10] > 0.999999
    assert drift["w"][-1] > 1.0 and drift["cos_d_theta"][-1] < 0.9  # |w_0| ~ 3: float reversal is lost
    assert all(len(v) == 300 for v in drift.values())
    assert torch.equal(exact.w_int, ExactPath(problem).w_int)  # exact made it back to w_0


def test_record_traces_norms_per_reverse_step():
    problem = make_problem(steps=20)
    l2 = HyperSpace.l2(problem.model, -2.0, "parameter")
    got = hypergradient(problem, l2, "exact", record=True)
    trace = got["trace"]
    assert trace["step"] == list(range(19, -1, -1))
    reference = hypergradient(problem, l2, "unrolled")  # autograd through the stored graph
    assert trace["theta_norm"][-1] == pytest.approx(flat(reference["log10_l2"]).norm().item(), rel=1e-6)
    assert trace["dw_norm"][-1] == pytest.approx(reference["w0"].norm().item(), rel=1e-6)



# -- exact vs unrolled ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "densenet"])
@pytest.mark.parametrize("sharing", ["parameter", "unit", "layer", "global"])
def test_exact_matches_unrolled(kind, sharing):
    steps = 50
    alpha = 0.3 + 0.1 * torch.rand(steps, generator=torch.Generator().manual_seed(2))
    beta = 0.85 + 0.1 * torch.rand(steps, generator=torch.Generator().manual_seed(3))
    problem = make_problem(kind, steps, beta=beta, alpha=alpha)
    l2 = HyperSpace.l2(problem.model, -2.0, sharing)
    exact = hypergradient(problem, l2, "exact")
    reference = hypergradient(problem, l2, "unrolled")
    assert rel(flat(exact["log10_l2"]), flat(reference["log10_l2"])) <= 1e-6
    for key in ("alpha", "beta", "w0"):  # per-step learning rates and momenta, and dL/dw_0
        assert rel(exact[key], reference[key]) <= 1e-6, key
    assert exact["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-9)


def test_exact_differs_from_unrolled_only_by_its_fixed_point_grid():
    """Global sharing sums sensitivities of opposite signs over the whole net, so exact's grid
    rounding (w at 2^-40, v at 2^-48) shows most there (relative 3e-7 against the 1e-6 bound).
    That it is the grid and nothing else: 4 more bits shrink the gap by more than 8x."""
    steps = 50
    alpha = 0.3 + 0.1 * torch.rand(steps, generator=torch.Generator().manual_seed(2))
    beta = 0.85 + 0.1 * torch.rand(steps, generator=torch.Generator().manual_seed(3))
    problem = make_problem("densenet", steps, beta=beta, alpha=alpha)
    l2 = HyperSpace.l2(problem.model, -2.0, "global")
    reference = flat(hypergradient(problem, l2, "unrolled")["log10_l2"])
    coarse = rel(flat(hypergradient(problem, l2, "exact")["log10_l2"]), reference)
    fine = rel(flat(hypergradient(problem, l2, "exact", w_bits=44, v_bits=52)["log10_l2"]), reference)
    assert coarse <= 1e-6 and fine <= coarse / 8, (coarse, fine)


def test_float_method_matches_unrolled_to_rounding_for_short_runs():
    problem = make_problem("mlp", steps=10)
    l2 = HyperSpace.l2(problem.model, -2.0, "unit")
    got, reference = hypergradient(problem, l2, "float"), hypergradient(problem, l2, "unrolled")
    assert rel(flat(got["log10_l2"]), flat(reference["log10_l2"])) <= 1e-10


def test_exact_matches_central_finite_differences():
    problem = make_problem("mlp", steps=50)
    l2 = HyperSpace.l2(problem.model, -1.5, "unit")
    grad = hypergradient(problem, l2, "exact")["log10_l2"]
    gen = torch.Generator().manual_seed(4)
    eps = 1e-5  # ReLU kinks make the seeded loss piecewise smooth: keep the probe local
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in l2.values.items()}
        shifted = []
        for sign in (1, -1):
            moved = l2.clone()
            for k in moved.values:
                moved.values[k] += sign * eps * direction[k]
            shifted.append(validation_loss(problem, moved))
        finite = (shifted[0] - shifted[1]) / (2 * eps)
        analytic = sum((grad[k] * direction[k]).sum() for k in grad).item()
        assert abs(finite - analytic) <= 1e-6 * abs(analytic), (finite, analytic)


# -- Hessian-vector products ------------------------------------------------------------------

def test_hvp_implementations_agree_and_match_differences_of_gradients():
    problem = make_problem("densenet", steps=3)
    w = problem.w0
    dv = torch.randn(w.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    h1, h2 = double_backward(problem, w, 2, dv).hdv, forward_over_reverse(problem, w, 2, dv).hdv
    assert rel(h2, h1) <= 1e-10
    eps = 1e-6
    finite = (problem.train_grad(w + eps * dv, 2) - problem.train_grad(w - eps * dv, 2)) / (2 * eps)
    assert rel(h1, finite) <= 1e-6


def test_validation_batchnorm_uses_the_whole_validation_sets_statistics():
    """f(w) normalises with the statistics of the whole, fixed validation set (dropout off): the
    module in training mode on all of it, not its running statistics (eval mode)."""
    problem = make_problem("densenet", steps=2)
    module = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1).to(F64)
    with torch.no_grad():
        for (name, p), value in zip(module.named_parameters(), problem.unflatten(problem.w0).values()):
            p.copy_(value)
        module.train()
        for m in module.modules():
            if isinstance(m, MaskedDropout):
                m.eval()  # dropout off, BatchNorm on the batch it sees
        whole = F.cross_entropy(module(problem.val_x), problem.val_y).item()
        module.eval()
        running = F.cross_entropy(module(problem.val_x), problem.val_y).item()
    assert problem.val_loss(problem.w0).item() == pytest.approx(whole, rel=1e-12)
    assert abs(whole - running) > 1e-3  # the two modes differ here, so the check can tell them apart


def test_batchnorm_running_statistics_are_untouched():
    torch.manual_seed(0)
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, in_channels=1).to(F64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    problem = make_problem("densenet", steps=5)
    problem = Problem(model, problem.x, problem.y, problem.val_x, problem.val_y, problem.alpha,
                      problem.beta, 16, 0)
    hypergradient(problem, HyperSpace.l2(model, -3.0), "exact")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# -- overflow ---------------------------------------------------------------------------------

def test_weights_past_the_fixed_point_range_raise():
    problem = make_problem("mlp", steps=5)
    problem.w0 = problem.w0 * 1e7
    with pytest.raises(FixedPointOverflow, match="fixed-point range"):
        hypergradient(problem, None, "exact")


def test_a_diverging_run_raises_instead_of_wrapping():
    problem = make_problem("mlp", steps=200, alpha=1e5)
    with pytest.raises(FixedPointOverflow, match="step"):
        hypergradient(problem, HyperSpace.l2(problem.model, 1.0), "exact")


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="exact, float, unrolled"):
        hypergradient(make_problem(steps=2), None, "magic")


# -- stored stretches (the adaptive method's core) ----------------------------------------------

def per_parameter_alphas(problem, lr, steps):
    """alpha_t = e^eta for each step, flat [T, P]."""
    return torch.cat([lr.value(n).reshape(-1) for n in problem.names]).expand(steps, -1).clone()


@pytest.mark.parametrize("sharing", ["unit", "parameter"])
def test_stored_path_matches_unrolled_for_per_parameter_lrs_and_l2(sharing):
    steps = 5
    problem = make_problem("mlp", steps=steps, beta=0.9)
    lr = HyperSpace.create(dict(zip(problem.names, problem.shapes)), "log_lr", math.log(0.3), sharing,
                           base=math.e, select=lambda name: True)
    first = next(iter(lr.values))
    lr.values[first] += torch.linspace(-0.2, 0.2, lr.values[first].numel(), dtype=F64).reshape(lr.values[first].shape)
    problem.alpha = per_parameter_alphas(problem, lr, steps)
    l2 = HyperSpace.l2(problem.model, -2.0, sharing)
    stored, reference = hypergradient(problem, l2, "stored"), hypergradient(problem, l2, "unrolled")
    d_eta = log_lr_hypergradient(problem, stored, lr)
    assert rel(flat(stored["log10_l2"]), flat(reference["log10_l2"])) <= 1e-10
    assert rel(flat(d_eta), flat(log_lr_hypergradient(problem, reference, lr))) <= 1e-10

    # ... and against central finite differences along a random direction in eta
    eps = 1e-6
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(6), dtype=F64)
                 for k, v in lr.values.items()}
    analytic = sum((d_eta[k] * direction[k]).sum() for k in direction).item()
    losses = []
    for sign in (1, -1):
        moved = lr.clone()
        for k in moved.values:
            moved.values[k] += sign * eps * direction[k]
        problem.alpha = per_parameter_alphas(problem, moved, steps)
        losses.append(validation_loss(problem, l2))
    assert (losses[0] - losses[1]) / (2 * eps) == pytest.approx(analytic, rel=1e-5)


# -- buffer hyperparameters: the scaled MLP's log scales s (w = e^s * z) ------------------------

def scaled_problem(steps=30, method_seed=0):
    torch.manual_seed(method_seed)
    model = MLP((12, 10, 10, 4), scaled=True).to(F64)
    base = make_problem("mlp", steps=steps)
    scales = HyperSpace.scales(model, 0.0)
    gen = torch.Generator().manual_seed(9)
    for v in scales.values.values():  # distinct per-unit values, so a mix-up of units shows
        v.copy_(0.3 * torch.randn(v.shape, generator=gen, dtype=F64))
    return Problem(model, base.x, base.y, base.val_x, base.val_y, alpha=base.alpha, beta=base.beta,
                   batch_size=16, seed=0, scales=scales)


def test_scale_mixed_products_agree_between_hvp_implementations():
    problem = scaled_problem()
    dv = torch.randn(problem.w0.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    h1, m1, _ = double_backward(problem, problem.w0, 3, dv)
    h2, m2, _ = forward_over_reverse(problem, problem.w0, 3, dv)
    assert rel(h2, h1) <= 1e-10 and rel(flat(m2), flat(m1)) <= 1e-10
    assert set(m1) == {"layers.0.s", "layers.1.s", "layers.2.s"} and flat(m1).norm() > 0


@pytest.mark.parametrize("method", ["exact", "float", "stored"])
def test_scale_hypergradient_matches_unrolled(method):
    problem = scaled_problem()
    l2 = HyperSpace.l2(problem.model, -2.0, "global")  # the fixed c ||z||^2 term
    got, reference = hypergradient(problem, l2, method), hypergradient(problem, l2, "unrolled")
    assert rel(flat(got["scale"]), flat(reference["scale"])) <= 1e-6
    assert rel(flat(got["log10_l2"]), flat(reference["log10_l2"])) <= 1e-6


def test_scale_hypergradient_matches_central_finite_differences():
    problem = scaled_problem(steps=30)
    l2 = HyperSpace.l2(problem.model, -2.0, "global")
    grad = hypergradient(problem, l2, "exact")["scale"]
    gen, eps = torch.Generator().manual_seed(4), 1e-5
    base = problem.scales.clone()
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=gen, dtype=F64) for k, v in base.values.items()}
        losses = []
        for sign in (1, -1):
            for k, v in problem.scales.values.items():
                v.copy_(base.values[k] + sign * eps * direction[k])
            losses.append(validation_loss(problem, l2))
        for k, v in problem.scales.values.items():
            v.copy_(base.values[k])
        finite = (losses[0] - losses[1]) / (2 * eps)
        analytic = sum((grad[k] * direction[k]).sum() for k in grad).item()
        assert analytic == pytest.approx(finite, rel=1e-6)
