"""The reverse-mode recursion of algorithms §4, over any path that can be walked backwards.

A path has `reverse_steps` steps; reverse step s uses the batch, masks, alpha and beta of
forward step `forward_step(s)` (the identity for exact and float paths; DrMAD's straight line
maps its S steps onto the T forward steps). Paths without velocities (DrMAD) give no
alpha/beta hypergradients.

    dw = grad f(w_T);  dv = 0
    for t = T-1 .. 0:
        d alpha_t = dw . v_t
        w_t      = w_{t+1} - alpha_t v_t
        dv      += alpha_t dw
        g_t      = grad L(w_t, t), by the very function the forward step used (bit for bit)
        H dv     = Hessian-vector product at w_t (either HVP implementation)
        v_{t-1}  = (v_t + (1 - beta_t) g_t) / beta_t
        d beta_t = dv . (v_{t-1} + g_t)
        dw      -= (1 - beta_t) (H + diag c) dv          c = 2 * 10^lambda (the L2 Hessian)
        d lambda -= (1 - beta_t) ln10 * c * w_t * dv      (mixed product, closed form)
        d s      -= (1 - beta_t) d(dv . g_t)/d s          (buffer hyperparameters, by autograd)
        dv      *= beta_t

with d s starting from the validation loss's own derivative df/ds at w_T. A path that can
check its round trip (exact reversal: back at w_0, v_0 and the buffer's initial state, bit for
bit) does so before any hypergradient is returned, and raises `ReversalError` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Protocol

import torch

from pipeline import data_parallel
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.hvp import HVP
from pipeline.hypergrad.problem import LN10, Problem


class ReversiblePath(Protocol):
    reverse_steps: int
    def forward_step(self, s: int) -> int: ...
    def w(self) -> torch.Tensor: ...
    def v(self) -> torch.Tensor | None: ...
    def undo_position(self, s: int) -> None: ...
    def undo_velocity(self, s: int, g: torch.Tensor) -> None: ...


def validation_gradient(problem: Problem, w: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor], float]:
    """df/dw and df/d(buffer hyperparameters) at w, and f(w)."""
    w = w.detach().requires_grad_()
    theta = {n: b.detach().requires_grad_() for n, b in problem.buffers().items()}
    loss = problem.val_loss(w, theta)
    dw, *d_theta = torch.autograd.grad(loss, [w, *theta.values()], materialize_grads=True)
    return dw, dict(zip(theta, d_theta)), loss.item()


class Reversal:
    """The recursion's state; `step(s)` runs reverse step s, so reversals can run in lockstep."""

    def __init__(self, problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP):
        self.problem, self.path, self.l2, self.hvp = problem, path, l2, hvp
        self.c = problem.l2_coefficients(l2)
        self.dw, self.d_scale, self.val_loss = validation_gradient(problem, path.w())
        self.dv = torch.zeros_like(self.dw)
        self.d_l2 = torch.zeros_like(self.dw)
        self.per_param_alpha = problem.alpha.dim() == 2
        self.d_alpha = torch.zeros(problem.alpha.shape, dtype=problem.dtype, device=self.dw.device)
        self.d_beta = torch.zeros(problem.steps, dtype=problem.dtype, device=self.dw.device)
        self.has_velocity = path.v() is not None
        self.recomputed = 0  # training gradients the HVP did not return (forward-over-reverse)

    def step(self, s: int) -> None:
        problem, path, c = self.problem, self.path, self.c
        t = path.forward_step(s)
        alpha, beta = problem.alpha_at(t), problem.beta[t].item()
        if self.has_velocity:
            v = path.v()
            self.d_alpha[t] += self.dw * v if self.per_param_alpha else torch.dot(self.dw, v)
        path.undo_position(s)
        w = path.w()
        self.dv = self.dv + alpha * self.dw
        hdv, mixed, g = self.hvp(problem, w, t, self.dv)
        # The forward step's gradient bit for bit (from the product when it computed it so), then
        # exactly the forward step's expression; the ranks' shares averaged like training's.
        if g is None:
            g, self.recomputed = problem.train_grad(w, t), self.recomputed + 1
        else:
            g = data_parallel.average([g])[0]
        g = g + c * w
        hdv, *products = data_parallel.average([hdv, *mixed.values()])
        mixed = dict(zip(mixed, products))
        path.undo_velocity(s, g)
        if self.has_velocity:
            self.d_beta[t] += torch.dot(self.dv, path.v() + g)
        self.dw = self.dw - (1 - beta) * (hdv + c * self.dv)
        self.d_l2 = self.d_l2 - (1 - beta) * LN10 * c * w * self.dv
        for name, m in mixed.items():
            self.d_scale[name] = self.d_scale[name] - (1 - beta) * m
        self.dv = beta * self.dv

    def d_theta(self) -> torch.Tensor:
        """The tuned hyperparameters' accumulated hypergradient, per element, as one vector:
        the buffer hyperparameters' where the problem has them, else the L2 one's."""
        if self.d_scale:
            return torch.cat([d.reshape(-1) for d in self.d_scale.values()])
        return self.d_l2

    def result(self) -> dict:
        verify = getattr(self.path, "verify_round_trip", None)
        if verify is not None:
            verify()
        out = {"w0": self.dw, "v0": self.dv, "val_loss": self.val_loss, "reverse_steps": self.path.reverse_steps,
               "work": {"hvps": self.path.reverse_steps, "gradients": 1 + self.recomputed}}
        if self.has_velocity:
            out.update(alpha=self.d_alpha, beta=self.d_beta)
        if self.l2 is not None:
            out["log10_l2"] = self.problem.reduce_l2(self.l2, self.d_l2)
        if self.problem.scales is not None:
            out["scale"] = self.problem.scales.reduce(self.d_scale)
        return out


def reverse(problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP,
            record: bool = False) -> dict:
    """Walk `path` back from w_T to w_0 and return the hypergradients, keyed like the
    hyperparameters: {"log10_l2": {key: tensor}, "alpha": [T] (or [T, P]), "beta": [T],
    "w0": flat dL/dw_0, "v0": dL/dv_{-1}, "val_loss": f(w_T)}; with `record`, also "trace":
    per reverse step (in reverse order) the norms of the accumulated per-element d theta
    (`Reversal.d_theta`) and of dw (thesis figs 3.4-3.5). Buffer hyperparameters' hypergradients
    come back as "scale"."""
    state = Reversal(problem, path, l2, hvp)
    trace = {"step": [], "theta_norm": [], "dw_norm": []}
    for s in reversed(range(path.reverse_steps)):
        state.step(s)
        if record:
            trace["step"].append(s)
            trace["theta_norm"].append(state.d_theta().norm().item())
            trace["dw_norm"].append(state.dw.norm().item())
    out = state.result()
    if record:
        out["trace"] = trace
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); NaN when either is zero (no direction to compare)."""
    na, nb = a.norm(), b.norm()
    return (torch.dot(a, b) / (na * nb)).item() if na > 0 and nb > 0 else float("nan")


@dataclass(frozen=True)
class Snapshot:
    """A reversal's state after one reverse step: what `lockstep` compares between two walks."""
    step: int
    w: torch.Tensor
    v: torch.Tensor
    d_theta: torch.Tensor
    dw: torch.Tensor


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of x is finite: then 0 * x sums to exactly 0, and an inf or NaN
    makes the sum NaN. A multiply and a sum cost a sixth of `isfinite(x).all()` on a CPU (a bool
    tensor and its reduction), and float reversal asks after every step."""
    return bool((x * 0).sum() == 0)


class Walk:
    """A reversal as an iterable: iterating runs every reverse step and yields a `Snapshot` at
    the kept rows (`keep`: counts of steps back less one; None keeps all); `result` holds the
    hypergradients once it ends, `w_T` where it started. `stop_when_lost`: once dw or w is not finite (float reversal
    overflows), stop paying for steps and report NaN hypergradients, which have no finite value."""

    def __init__(self, problem: Problem, path: ReversiblePath, l2: HyperSpace | None, hvp: HVP,
                 keep: set[int] | None = None, stop_when_lost: bool = False):
        self.problem, self.path, self.l2, self.hvp = problem, path, l2, hvp
        self.keep, self.stop_when_lost, self.result = keep, stop_when_lost, None
        self.w_T = path.w()  # where the walk starts

    def __iter__(self) -> Iterator[Snapshot]:
        state, path, lost = Reversal(self.problem, self.path, self.l2, self.hvp), self.path, False
        for j, s in enumerate(reversed(range(path.reverse_steps))):
            if not lost:
                state.step(s)
                lost = self.stop_when_lost and not (all_finite(state.dw) and all_finite(path.w()))
                if lost:
                    state.dw = torch.full_like(state.dw, float("nan"))
                    state.d_l2 = torch.full_like(state.d_l2, float("nan"))
                    state.d_scale = {k: torch.full_like(v, float("nan")) for k, v in state.d_scale.items()}
            if self.keep is None or j in self.keep:
                yield Snapshot(s, path.w(), path.v(), state.d_theta(), state.dw)
        self.result = state.result()


TRACE_KEYS = ("step", "theta_norm", "dw_norm", "w", "v", "d_theta", "dw", "cos_d_theta")


def compare_walks(exact: Iterable[Snapshot], plain: Iterable[Snapshot]) -> dict[str, list[float]]:
    """Run two walks side by side; per kept row (thesis figs 3.4-3.6) the norms of the exact d
    theta and dw, the distances between the two walks' w, v, d theta and dw, and the cosine of
    their d theta."""
    out = {k: [] for k in TRACE_KEYS}
    for a, b in zip(exact, plain, strict=True):
        row = (a.step, a.d_theta.norm(), a.dw.norm(), (a.w - b.w).norm(), (a.v - b.v).norm(),
               (a.d_theta - b.d_theta).norm(), (a.dw - b.dw).norm(), cosine(a.d_theta, b.d_theta))
        for key, value in zip(TRACE_KEYS, row):
            out[key].append(float(value))
    return out


def lockstep(problem: Problem, exact_path: ReversiblePath, float_path: ReversiblePath,
             l2: HyperSpace | None, hvp: HVP, keep: set[int] | None = None) -> tuple[dict, dict, dict[str, list[float]]]:
    """Walk a trajectory back with exact arithmetic and with floats side by side (the float
    path from the same w_T, v_T, or from its own float run of the same seed): both results and
    `compare_walks`' trace. Float reversal that overflows is stopped and its hypergradient is
    NaN from there on. `keep`: the rows to trace (default: every step; each row costs a few
    passes over the weights)."""
    exact = Walk(problem, exact_path, l2, hvp, keep)
    plain = Walk(problem, float_path, l2, hvp, keep, stop_when_lost=True)
    trace = compare_walks(exact, plain)
    return exact.result, plain.result, trace


def reversal_drift(problem: Problem, exact_path: ReversiblePath, float_path: ReversiblePath,
                   l2: HyperSpace | None, hvp: HVP) -> dict[str, list[float]]:
    """Thesis fig. 3.6: the per-step trace of `lockstep`."""
    return lockstep(problem, exact_path, float_path, l2, hvp)[2]
