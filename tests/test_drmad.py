"""DrMAD and DrMAD2 where theory says they must coincide with exact and float reversal."""
import math
import pytest
import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad import FloatPath, Problem, hypergradient
from pipeline.hypergrad.drmad import gamma_estimate, heuristic_steps, step_map
from pipeline.models import MLP
from helpers import rel

F64 = torch.float64


class ConstantGradient(Problem):
    """Training loss a.w: every step moves by the same vector, so the path is a straight line
    of equally spaced iterates; the validation loss is curved so dw_0 is not trivial."""

    def train_loss(self, w, t, batch=None, buffers=None):
        if isinstance(w, list):  # per-parameter leaves (train_grad, double_backward)
            w = self.join(w)
        return (self.direction * w).sum()

    def val_loss(self, w, buffers=None):
        return torch.log1p((w - 0.3).pow(2)).sum() + (w[:-1] * w[1:]).sum()


def straight_problem(steps=30):
    torch.manual_seed(0)
    model = MLP((5, 4, 3)).to(F64)
    x, y = torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,))
    problem = ConstantGradient(model, x, y, x, y, alpha=torch.full((steps,), 0.05),
                               beta=torch.zeros(steps), batch_size=4, seed=0)
    problem.direction = torch.randn(problem.numel, dtype=F64)
    return problem


def test_drmad_on_a_straight_path_equals_exact():
    problem = straight_problem()
    exact = hypergradient(problem, None, "exact")
    drmad = hypergradient(problem, None, "drmad", reverse_steps=problem.steps)
    assert rel(drmad["w0"], exact["w0"]) <= 1e-6
    assert drmad["val_loss"] == pytest.approx(exact["val_loss"], rel=1e-9)


def mlp_problem(steps=40):
    torch.manual_seed(0)
    model = MLP((12, 10, 4)).to(F64)
    x, vx = torch.randn(64, 12, dtype=F64), torch.randn(32, 12, dtype=F64)
    return Problem(model, x, torch.randint(0, 4, (64,)), vx, torch.randint(0, 4, (32,)),
                   alpha=torch.full((steps,), 0.3), beta=torch.full((steps,), 0.9), batch_size=16, seed=0)


def test_drmad2_with_k_equal_t_is_float_reversal():
    problem = mlp_problem()
    l2 = HyperSpace.l2(problem.model, -2.0, "unit")
    plain = hypergradient(problem, l2, "float")
    drmad2 = hypergradient(problem, l2, "drmad2", last=problem.steps)
    for key in plain["log10_l2"]:
        torch.testing.assert_close(drmad2["log10_l2"][key], plain["log10_l2"][key], rtol=1e-12, atol=0)
    torch.testing.assert_close(drmad2["w0"], plain["w0"], rtol=1e-12, atol=0)


def test_drmad_reports_its_reverse_steps_and_heuristic_choice():
    problem = mlp_problem()
    l2 = HyperSpace.l2(problem.model, -2.0, "layer")
    fixed = hypergradient(problem, l2, "drmad", reverse_steps=7)
    assert fixed["reverse_steps"] == 7 and "alpha" not in fixed
    auto = hypergradient(problem, l2, "drmad", multiplier=2.0)
    distances = FloatPath.train(problem, problem.l2_coefficients(l2)).distances
    by_hand = round(1 / (2.0 * gamma_estimate(distances)))  # S = 1 / (multiplier * gamma)
    assert auto["reverse_steps"] == by_hand and by_hand != hypergradient(problem, l2, "drmad")["reverse_steps"]
    both = hypergradient(problem, l2, "drmad2", last=10, reverse_steps=5)
    assert both["reverse_steps"] == 15


def test_heuristic_recovers_a_known_gamma():
    gamma, total = 0.004, 3.0
    t = torch.arange(1, 501, dtype=F64)
    distances = torch.minimum(gamma * t * total, torch.tensor(total))  # straight, then flat
    distances[-1] = total
    assert gamma_estimate(distances) == pytest.approx(gamma, rel=1e-12)
    assert heuristic_steps(distances) == 250
    assert heuristic_steps(distances, multiplier=10) == 25


def test_heuristic_weightings_on_a_curved_path_against_hand_values():
    """|w_t - w_0| = sqrt(t): the text's reading (t = 1..20, weights 1/t, S rounded) and the scripts'
    (t = 5..19, weights 1/2 + 2^-15, 2^-2, ..., 2^-15, S rounded up), each summed here by hand.
    On this path they disagree, and 48.2 rounds to 48 but the scripts take 49."""
    distances = torch.arange(1, 401, dtype=F64).sqrt()
    total = math.sqrt(400)
    text = sum(t ** -1.5 for t in range(1, 21)) / (total * sum(1 / t for t in range(1, 21)))
    weights = [0.5 + 2 ** -15] + [2.0 ** -k for k in range(2, 16)]
    scripts = sum(w * math.sqrt(t) / (t * total) for w, t in zip(weights, range(5, 20)))
    assert gamma_estimate(distances) == pytest.approx(text, rel=1e-12)
    assert gamma_estimate(distances, "scripts") == pytest.approx(scripts, rel=1e-12)
    assert (1 / text, 1 / scripts) == (pytest.approx(33.148, abs=1e-3), pytest.approx(48.204, abs=1e-3))
    assert heuristic_steps(distances, 1.0, "text") == 33
    assert heuristic_steps(distances, 1.0, "scripts") == 49
    assert gamma_estimate(distances[:4], "scripts") == gamma_estimate(distances[:4])  # too short: the text's gamma


def test_step_maps():
    distances = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0])  # |w_t - w_0| for t = 1..5
    assert [step_map("same", 3, 5)(s) for s in range(3)] == [0, 1, 2]
    assert [step_map("stride", 3, 6)(s) for s in range(3)] == [0, 2, 4]
    nearest = step_map("nearest", 2, 5, distances)  # line points at shares 0 and 0.5 of the path
    assert [nearest(0), nearest(1)] == [0, 4]  # w_0 sits at share 0; w_4 (0.6) is closest to 0.5
