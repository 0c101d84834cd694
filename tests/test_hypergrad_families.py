"""Truncated reversal, implicit differentiation and the greedy one-step hypergradient against
independent references (float64, CPU).

- truncated: autograd through the last K unrolled steps from w_{T-K} (earlier state held
  fixed); K = T is float reversal, K = 1 the greedy hypergradient;
- greedy: autograd through one unrolled step from w_{T-1};
- ift: the closed-form hypergradient of an L2-regularised logistic regression trained to
  convergence (the optimum's stationarity condition differentiated, the Hessian solved exactly).
"""
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import FloatPath, Problem, hypergradient, unrolled
from pipeline.models import MLP
from helpers import rel

F64 = torch.float64
STEPS = 24


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


def scaled_mlp_problem(steps=STEPS, **changes) -> Problem:
    """The quality study's form, small: a tanh MLP w = e^s z with distinct per-unit log scales s."""
    torch.manual_seed(0)
    model = MLP((12, 10, 10, 4), scaled=True, activation="tanh").to(F64)
    scales = HyperSpace.scales(model, 0.0)
    gen = torch.Generator().manual_seed(9)
    for v in scales.values.values():
        v.copy_(0.3 * torch.randn(v.shape, generator=gen, dtype=F64))
    x, vx = torch.randn(64, 12, generator=gen, dtype=F64), torch.randn(32, 12, generator=gen, dtype=F64)
    y, vy = torch.randint(0, 4, (64,), generator=gen), torch.randint(0, 4, (32,), generator=gen)
    args = dict(model=model, x=x, y=y, val_x=vx, val_y=vy, alpha=torch.full((steps,), 0.3),
                beta=torch.full((steps,), 0.9), batch_size=16, seed=0, scales=scales)
    return Problem(**{**args, **changes})


def penalty(problem):
    return HyperSpace.l2(problem.model, -2.0, "unit")


def last_steps_reference(problem: Problem, l2, k: int) -> dict:
    """Autograd through the last k steps only: train T - k steps in floats (the same bits as the
    full run's first T - k), then unroll the rest from (w_{T-k}, v_{T-k-1}) as a problem of its own
    whose batches are those of steps T-k .. T-1."""
    head = problem.steps - k
    before = scaled_mlp_problem(steps=head) if head else None
    w, v = problem.w0, torch.zeros_like(problem.w0)
    if before is not None:
        trained = FloatPath.train(before, before.l2_coefficients(l2))
        w, v = trained.w(), trained.v()
    tail = scaled_mlp_problem(steps=k, alpha=problem.alpha[head:], beta=problem.beta[head:], w0=w, v0=v,
                              first_step=head)
    return unrolled.hypergradient(tail, l2)


# -- truncated ----------------------------------------------------------------------------------

def test_truncated_with_k_equal_to_t_is_float_reversal_bit_for_bit():
    problem = scaled_mlp_problem()
    l2 = penalty(problem)
    truncated = hypergradient(problem, l2, "truncated", truncate=STEPS)
    floats = hypergradient(problem, l2, "float")
    for key in ("scale", "log10_l2"):
        assert all(torch.equal(truncated[key][k], floats[key][k]) for k in floats[key])
    assert torch.equal(truncated["alpha"], floats["alpha"]) and torch.equal(truncated["beta"], floats["beta"])
    assert truncated["work"] == floats["work"] == {"hvps": STEPS, "gradients": 1}


@pytest.mark.parametrize("k", [1, 5, STEPS - 1])
def test_truncated_equals_autograd_through_the_last_k_steps(k):
    problem = scaled_mlp_problem()
    l2 = penalty(problem)
    got = hypergradient(problem, l2, "truncated", truncate=k)
    reference = last_steps_reference(problem, l2, k)
    for key in ("scale", "log10_l2"):
        assert rel(flat(got[key]), flat(reference[key])) <= 1e-9
        # the fixture tells K from its neighbours: an off-by-one is not within the tolerance
        for wrong in (k - 1, k + 1):
            if 1 <= wrong <= STEPS:
                assert rel(flat(last_steps_reference(problem, l2, wrong)[key]), flat(reference[key])) > 1e-3
    assert got["work"] == {"hvps": k, "gradients": 1} and got["reverse_steps"] == k


def test_truncated_refuses_k_outside_1_to_t():
    problem = scaled_mlp_problem(steps=4)
    path = FloatPath.train(problem, problem.l2_coefficients(None))
    from pipeline.hypergrad.truncated import TruncatedPath
    for k in (0, 5):
        with pytest.raises(ValueError, match="truncate"):
            TruncatedPath(path, k)


# -- greedy -------------------------------------------------------------------------------------

def test_greedy_equals_autograd_through_one_unrolled_step():
    problem = scaled_mlp_problem()
    l2 = penalty(problem)
    got = hypergradient(problem, l2, "greedy")
    reference = last_steps_reference(problem, l2, 1)
    for key in ("scale", "log10_l2"):
        assert rel(flat(got[key]), flat(reference[key])) <= 1e-9
    assert got["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-12)
    assert got["work"] == {"hvps": 1, "gradients": 1}


def test_greedy_and_truncated_at_k_1_agree_though_computed_apart():
    """greedy: autograd through the step; truncated: the reverse recursion's closed forms."""
    problem = scaled_mlp_problem()
    l2 = penalty(problem)
    greedy, truncated = hypergradient(problem, l2, "greedy"), hypergradient(problem, l2, "truncated", truncate=1)
    for key in ("scale", "log10_l2"):
        assert rel(flat(greedy[key]), flat(truncated[key])) <= 1e-10


# -- implicit differentiation --------------------------------------------------------------------

def logistic_problem(steps=800) -> tuple[Problem, HyperSpace]:
    """L2-regularised multinomial logistic regression, full batch: strongly convex (c >= 0.2)."""
    gen = torch.Generator().manual_seed(3)
    x, vx = torch.randn(60, 5, generator=gen, dtype=F64), torch.randn(40, 5, generator=gen, dtype=F64)
    truth = torch.randn(5, 3, generator=gen, dtype=F64)
    y, vy = (x @ truth).argmax(1), (vx @ truth + 0.5 * torch.randn(40, 3, generator=gen, dtype=F64)).argmax(1)
    model = nn.Linear(5, 3, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(0.1 * torch.randn(3, 5, generator=gen, dtype=F64))
    problem = Problem(model, x, y, vx, vy, alpha=torch.full((steps,), 1.0), beta=torch.full((steps,), 0.9),
                      batch_size=60, seed=0)
    l2 = HyperSpace.l2(model, -1.0, "unit")
    l2.values["weight"].copy_(torch.tensor([-1.0, -0.7, -0.4], dtype=F64))  # a distinct c per class
    return problem, l2


def closed_form(problem: Problem, l2: HyperSpace, w: torch.Tensor) -> torch.Tensor:
    """d f(w*) / d lambda from grad L(w*) + c w* = 0: dw*/d lambda_k = -(H + C)^-1 (ln10 c w*)[unit k],
    with H the full training set's Hessian computed entry by entry and the system solved exactly."""
    def train(flat_w):
        return F.cross_entropy(problem.x @ flat_w.view(3, 5).T, problem.y)

    c = problem.l2_coefficients(l2)
    hessian = torch.autograd.functional.hessian(train, w) + torch.diag(c)
    w_leaf = w.clone().requires_grad_()
    u = torch.autograd.grad(F.cross_entropy(problem.val_x @ w_leaf.view(3, 5).T, problem.val_y), w_leaf)[0]
    p = torch.linalg.solve(hessian, u)
    per_element = -math.log(10) * c * w * p
    return per_element.view(3, 5).sum(1)


def test_ift_on_a_converged_strongly_convex_problem_equals_the_closed_form():
    problem, l2 = logistic_problem()
    trained = FloatPath.train(problem, problem.l2_coefficients(l2))
    w = trained.w()
    gradient = problem.train_grad(w, 0) + problem.l2_coefficients(l2) * w
    assert gradient.norm() < 1e-12  # converged: the theorem's premise
    truth = closed_form(problem, l2, w)
    errors = []
    for terms in (0, 2, 8, 32, 128):
        got = hypergradient(problem, l2, "ift", neumann_terms=terms, neumann_step=1.0)
        errors.append(rel(got["log10_l2"]["weight"], truth))
        assert got["work"] == {"hvps": terms + 1, "gradients": 1}
    assert all(a > b for a, b in zip(errors, errors[1:])), errors  # approaches it as the series grows
    assert errors[-1] <= 1e-6 and errors[0] > 1e-2, errors
    # reversal through the whole converged run reaches the same number: w_0 is forgotten
    assert rel(hypergradient(problem, l2, "float")["log10_l2"]["weight"], truth) <= 1e-6


def test_ift_default_series_step_is_the_training_step_size():
    problem, l2 = logistic_problem(steps=400)
    default = hypergradient(problem, l2, "ift", neumann_terms=5)
    explicit = hypergradient(problem, l2, "ift", neumann_terms=5, neumann_step=1.0)
    other = hypergradient(problem, l2, "ift", neumann_terms=5, neumann_step=0.5)
    assert torch.equal(default["log10_l2"]["weight"], explicit["log10_l2"]["weight"])
    assert not torch.equal(default["log10_l2"]["weight"], other["log10_l2"]["weight"])


# -- on the quality MLP: finite, shaped like exact ---------------------------------------------------

@pytest.mark.parametrize("method, options, hvps", [("truncated", {"truncate": 10}, 10),
                                                   ("ift", {"neumann_terms": 10}, 11), ("greedy", {}, 1)])
def test_each_family_on_the_scaled_mlp_is_finite_and_shaped_like_exact(method, options, hvps):
    problem = scaled_mlp_problem()
    l2 = HyperSpace.l2(problem.model, -4.0, "global")
    exact = hypergradient(problem, l2, "exact")
    got = hypergradient(problem, l2, method, **options)
    for key in ("scale", "log10_l2"):
        assert set(got[key]) == set(exact[key])
        for name, value in got[key].items():
            assert value.shape == exact[key][name].shape and bool(torch.isfinite(value).all())
    assert flat(got["scale"]).norm() > 0
    assert got["work"]["hvps"] == hvps and got["val_loss"] == pytest.approx(exact["val_loss"], rel=1e-9)
