"""DrMAD and DrMAD2 against an independent reference: the thesis' Algorithm 3 written out on a
tiny curved problem (a tanh network coded by hand), with explicit Hessians and explicit mixed
derivatives, no code of the reverse recursion, the paths or the HVPs shared. Compared at S > 1,
with both step maps, for DrMAD2 with 0 < K < T, and through the drmad stage's own path wiring."""
import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.nn import functional as F

from pipeline.config import parse_params
from pipeline.experiments.drmad import reverse_path
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import Problem, hypergradient
from pipeline.hypergrad.hvp import double_backward
from pipeline.hypergrad.reverse import reverse

F64 = torch.float64
SIZES = (3, 4, 2)


class Tanh2(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(SIZES[0], SIZES[1]), nn.Linear(SIZES[1], SIZES[2])

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def by_hand(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The network's logits from the flat weights in named_parameters order, coded directly."""
    a, b = SIZES[0] * SIZES[1], SIZES[1] * SIZES[2]
    w1, b1 = w[:a].view(SIZES[1], SIZES[0]), w[a:a + SIZES[1]]
    w2, b2 = w[a + SIZES[1]:a + SIZES[1] + b].view(SIZES[2], SIZES[1]), w[a + SIZES[1] + b:]
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def make(steps=24, seed=0):
    torch.manual_seed(seed)
    model = Tanh2().to(F64)
    x, vx = torch.randn(40, SIZES[0], dtype=F64), torch.randn(20, SIZES[0], dtype=F64)
    y, vy = torch.randint(0, 2, (40,)), torch.randint(0, 2, (20,))
    alpha = 0.4 + 0.2 * torch.rand(steps, generator=torch.Generator().manual_seed(1), dtype=F64)
    problem = Problem(model, x, y, vx, vy, alpha=alpha, beta=torch.full((steps,), 0.8), batch_size=8, seed=seed)
    l2 = HyperSpace.l2(problem.model, -1.5, "layer")
    return problem, l2


def mask_and_values(problem, l2):
    """Per element: which L2 group it belongs to (or -1) and the log10 values, for the reference."""
    keys = list(l2.values)
    groups, start = torch.full((problem.numel,), -1), 0
    for name, n in zip(problem.names, problem.numels):
        if name in l2.shapes:
            groups[start:start + n] = keys.index(l2.key(name))
        start += n
    return groups, torch.stack([l2.values[k].reshape(()) for k in keys])


def train_loss(problem, w, lam, groups, t):
    """Step t's cross-entropy plus sum_j 10^lambda_j w_j^2, coded directly."""
    x, y = problem.batch(t)
    coef = torch.where(groups >= 0, 10.0 ** lam[groups.clamp(min=0)], torch.zeros((), dtype=F64))
    return F.cross_entropy(by_hand(w, x), y) + (coef * w * w).sum()


def val_loss(problem, w):
    return F.cross_entropy(by_hand(w, problem.val_x), problem.val_y)


def forward(problem, lam, groups):
    """w_t for t = 0..T of classical momentum, by hand."""
    ws, v = [problem.w0.clone()], torch.zeros_like(problem.w0)
    for t in range(problem.steps):
        w = ws[-1].clone().requires_grad_()
        g = torch.autograd.grad(train_loss(problem, w, lam, groups, t), w)[0]
        beta = problem.beta[t].item()
        v = beta * v - (1 - beta) * g
        ws.append(ws[-1] + problem.alpha[t].item() * v)
    return ws


def algorithm3(problem, lam, groups, positions, steps_of, dw=None, dv=None, d_lam=None):
    """The reverse recursion over given positions (reverse step s at positions[s], using forward
    step steps_of(s)): dv += alpha dw; dw -= (1 - beta) H dv; d lambda -= (1 - beta) (d^2 L / d lambda dw) dv;
    dv *= beta. H and the mixed derivative are explicit matrices."""
    dv = torch.zeros_like(problem.w0) if dv is None else dv
    d_lam = torch.zeros_like(lam) if d_lam is None else d_lam
    for s in reversed(range(len(positions))):
        t, w = steps_of(s), positions[s]
        alpha, beta = problem.alpha[t].item(), problem.beta[t].item()
        dv = dv + alpha * dw
        H = hessian(lambda u: train_loss(problem, u, lam, groups, t), w)
        mixed = jacobian(lambda lam_: _grad_w(problem, w, lam_, groups, t), lam)  # d g / d lambda: [P, groups]
        dw = dw - (1 - beta) * H @ dv
        d_lam = d_lam - (1 - beta) * mixed.T @ dv
        dv = beta * dv
    return dw, dv, d_lam


def _grad_w(problem, w, lam, groups, t):
    u = w.detach().requires_grad_()
    return torch.autograd.grad(train_loss(problem, u, lam, groups, t), u, create_graph=True)[0]


def line(w0, w_end, steps):
    return [(s / steps) * w_end + (1 - s / steps) * w0 for s in range(steps)]


def join(result, l2):
    return torch.stack([result["log10_l2"][k].reshape(()) for k in l2.values])


@pytest.mark.parametrize("step_map", ["same", "stride"])
def test_drmad_equals_algorithm3_on_a_curved_problem(step_map):
    problem, l2 = make()
    groups, lam = mask_and_values(problem, l2)
    ws = forward(problem, lam, groups)
    S = 7  # 1 < S < T
    maps = {"same": lambda s: s, "stride": lambda s: s * problem.steps // S}
    dw0 = torch.func.grad(lambda u: val_loss(problem, u))(ws[-1])
    dw, _, d_lam = algorithm3(problem, lam, groups, line(ws[0], ws[-1], S), maps[step_map], dw0)
    got = hypergradient(problem, l2, "drmad", reverse_steps=S, step_map=step_map)
    assert got["reverse_steps"] == S
    assert torch.allclose(join(got, l2), d_lam, rtol=1e-9, atol=0)
    assert torch.allclose(got["w0"], dw, rtol=1e-9, atol=1e-14)
    # the curvature matters: a line at other positions (w_T -> w_0 shifted by one step) differs
    _, _, d_shift = algorithm3(problem, lam, groups, line(ws[0], ws[-1], S)[1:] + [ws[-1]], maps[step_map], dw0)
    assert not torch.allclose(d_shift, d_lam, rtol=1e-3)


def test_drmad2_equals_float_reversal_then_the_line():
    problem, l2 = make()
    groups, lam = mask_and_values(problem, l2)
    ws = forward(problem, lam, groups)
    K, S = 5, 6  # 0 < K < T
    head = problem.steps - K
    dw0 = torch.func.grad(lambda u: val_loss(problem, u))(ws[-1])
    dw, dv, d_lam = algorithm3(problem, lam, groups, ws[head:problem.steps], lambda s: head + s, dw0)
    dw, _, d_lam = algorithm3(problem, lam, groups, line(ws[0], ws[head], S), lambda s: min(s, head - 1), dw, dv, d_lam)
    got = hypergradient(problem, l2, "drmad2", last=K, reverse_steps=S)
    assert got["reverse_steps"] == K + S
    assert torch.allclose(join(got, l2), d_lam, rtol=1e-8, atol=0)
    assert torch.allclose(got["w0"], dw, rtol=1e-8, atol=1e-13)


@pytest.mark.parametrize("method", ["drmad", "drmad2"])
def test_the_drmad_stage_wires_the_same_path(method):
    """`reverse_path` (what the drmad stage reverses) from a trainer's end state."""
    problem, l2 = make()
    groups, lam = mask_and_values(problem, l2)
    ws = forward(problem, lam, groups)
    v_T = (ws[-1] - ws[-2]) / problem.alpha[-1].item()  # w_T = w_{T-1} + alpha v_{T-1}

    class EndState:  # what reverse_path reads of a Trainer
        params = [ws[-1]]

        class state:
            velocity = [v_T]
    distances = torch.stack([(w - ws[0]).norm() for w in ws[1:]])
    params = parse_params({"drmad": {"method": method, "reverse_steps": 6, "last": 4, "step_map": "same"}})
    path = reverse_path(params, problem, EndState, distances)
    got = join(reverse(problem, path, l2, double_backward), l2)
    dw0 = torch.func.grad(lambda u: val_loss(problem, u))(ws[-1])
    if method == "drmad":
        expected = algorithm3(problem, lam, groups, line(ws[0], ws[-1], 6), lambda s: s, dw0)[2]
    else:
        head = problem.steps - 4
        dw, dv, d_lam = algorithm3(problem, lam, groups, ws[head:problem.steps], lambda s: head + s, dw0)
        expected = algorithm3(problem, lam, groups, line(ws[0], ws[head], 6), lambda s: min(s, head - 1), dw, dv, d_lam)[2]
    assert torch.allclose(got, expected, rtol=1e-8, atol=0)
    assert not math.isclose(got.norm().item(), 0.0)
