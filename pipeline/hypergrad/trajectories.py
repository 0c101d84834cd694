"""Training paths that can be walked backwards: exact fixed-point SGD and plain float SGD.

Both run classical momentum (algorithms §3)

    v_t = beta_t v_{t-1} - (1 - beta_t) g_t,    w_{t+1} = w_t + alpha_t v_t

forwards, and then undo it one step at a time for the reverse pass:
  - `ExactPath` keeps w and v as int64 fixed-point numbers (value = integer * 2^-radix_bits)
    and every step is a bijection on integers: the updates are integer additions and the
    multiplication by beta = n / 2^16 stores its remainder in a bits-back buffer. Reversal
    is bit-exact, whatever T is.
  - `FloatPath` undoes the float updates by division (v += (1-beta) g; v /= beta), which
    loses log2(1/beta) bits per step: the inexact baseline of thesis fig. 3.6.
"""
from __future__ import annotations

import torch

from pipeline.hypergrad.bitsback import BitsBackBuffer, _divide_same_n
from pipeline.hypergrad.fused import fused
from pipeline.hypergrad.problem import Problem

# |x| < 2^61 leaves headroom for undoing beta (v * 2^16 / n, beta >= 0.5) within int64.
LIMIT = 2 ** 61


class FixedPointOverflow(ArithmeticError):
    """The trajectory left the range the fixed-point representation can hold exactly."""


class ReversalError(RuntimeError):
    """Exact reversal did not come back to where training started: its hypergradient is void."""


class _ForwardStepsOneToOne:
    """Exact and float paths undo every forward step: reverse step s is forward step s."""
    problem: Problem

    @property
    def reverse_steps(self) -> int:
        return self.problem.steps

    def forward_step(self, s: int) -> int:
        return s


class FloatPath(_ForwardStepsOneToOne):
    def __init__(self, problem: Problem, w: torch.Tensor, v: torch.Tensor, distances: torch.Tensor | None = None):
        """At (w_T, v_T) of a float run; `distances`: that run's |w_t - w_0| (DrMAD's heuristic)."""
        self.problem, self._w, self._v, self.distances = problem, w.clone(), v.clone(), distances

    @classmethod
    def train(cls, problem: Problem, l2_coef: torch.Tensor, keep_every: int | None = None) -> "FloatPath":
        """Float SGD from w_0; records distances[t-1] = |w_t - w_0| (DrMAD's step heuristic), w_{T-1}
        as `w_before` (the greedy hypergradient's) and, with `keep_every`, the iterates w_0, w_k,
        w_2k, ... on the CPU (parameter-path figures)."""
        path = cls(problem, problem.w0, torch.zeros_like(problem.w0))
        path.w_before, distances, path.iterates = problem.w0, [], [problem.w0.cpu()] if keep_every else []
        for t in range(problem.steps):
            path.step(t, l2_coef)
            distances.append(torch.linalg.vector_norm(path._w - problem.w0))
            if keep_every and (t + 1) % keep_every == 0:
                path.iterates.append(path._w.cpu())
        path.distances = torch.stack(distances).double().cpu()
        return path

    def step(self, t: int, l2_coef: torch.Tensor) -> None:
        """Forward step t in floats (training in pieces: a search's rungs)."""
        g = self.problem.train_grad(self._w, t) + l2_coef * self._w
        self.w_before, beta = self._w, self.problem.beta[t].item()
        self._v = beta * self._v - (1 - beta) * g
        self._w = self._w + self.problem.alpha_at(t) * self._v

    def w(self) -> torch.Tensor:
        return self._w

    def v(self) -> torch.Tensor:
        return self._v

    def undo_position(self, t: int) -> None:
        self._w = self._w - self.problem.alpha_at(t) * self._v

    def undo_velocity(self, t: int, g: torch.Tensor) -> None:
        beta = self.problem.beta[t].item()
        self._v = (self._v + (1 - beta) * g) / beta


def _out_of_range(x: torch.Tensor) -> torch.Tensor:
    return ~((x < LIMIT) & (x > -LIMIT))  # NaN compares False: out of range too


def _scaled_gradient(g: torch.Tensor, gain: float, v_scale: float) -> torch.Tensor:
    """(1 - beta) g on the velocities' grid, before rounding."""
    return gain * g.to(torch.float64) * v_scale


def _rounded(x: torch.Tensor) -> torch.Tensor:
    """round(x) as int64, and 0 where x is out of range or NaN (training stops there: see
    `_descend`), so the conversion is always defined (a where, not nan_to_num: it vectorises)."""
    return torch.round(torch.where(x.abs() < LIMIT, x, 0.0)).to(torch.int64)


@fused
def _descend(w_int, v_beta, g, gain: float, v_scale: float, step_scale, w_scale: float):
    """One exact step after the buffer's v * beta: v = v * beta - round((1 - beta) g), then
    w += round(alpha v); also w as floats and whether anything left the exact range."""
    scaled = _scaled_gradient(g, gain, v_scale)
    v = v_beta - _rounded(scaled)
    w = w_int + torch.round(step_scale * v.to(torch.float64)).to(torch.int64)
    overflow = (_out_of_range(scaled) | _out_of_range(v) | _out_of_range(w)).any()
    return w, v, overflow, w.to(torch.float64) / w_scale


@fused
def _undo_position(w_int, v_int, step_scale, w_scale: float):
    w = w_int - torch.round(step_scale * v_int.to(torch.float64)).to(torch.int64)
    return w, w.to(torch.float64) / w_scale


def _add_gradient(v_int, g, gain: float, v_scale: float):
    return v_int + _rounded(_scaled_gradient(g, gain, v_scale))


@fused
def _undo_velocity(v_int, g, gain: float, v_scale: float, x, top, below, n: int):
    """v_{t-1} = (v_t + round((1 - beta) g)) / beta through the buffer's equal-momentum divide, and
    v_{t-1} as floats: one kernel."""
    v, x, top, pop_at = _divide_same_n.eager(_add_gradient(v_int, g, gain, v_scale), x, top, below, n)
    return v, v.to(torch.float64) / v_scale, x, top, pop_at


class ExactPath(_ForwardStepsOneToOne):
    """Fixed-point SGD: w = w_int * 2^-w_bits, v = v_int * 2^-v_bits.

    Multiplying v by n / 2^16 exactly replaces its lowest 16 bits by bits from the buffer, an
    error of up to 2^16 units per step: so v carries 16 more fractional bits than the precision
    wanted (v_bits = 48: |v| < 8192 at 2^-32 per step; w_bits = 40: |w| < 2e6 at 1e-12)."""

    LIMIT = LIMIT

    def __init__(self, problem: Problem, w_bits: int = 40, v_bits: int = 48):
        self.problem, self.w_bits, self.v_bits = problem, w_bits, v_bits
        self.w_scale, self.v_scale = 2.0 ** w_bits, 2.0 ** v_bits
        self.w_int = self.to_fixed(problem.w0, w_bits, "initial weights")
        self.v_int = torch.zeros_like(self.w_int)
        self.w_start = self.w_int.clone()
        self.buffer = BitsBackBuffer(problem.numel, problem.w0.device)
        self._w = self._v = None  # (integers, their floats) of the last conversion

    def to_fixed(self, x: torch.Tensor, bits: int, what: str) -> torch.Tensor:
        scaled = x.to(torch.float64) * 2.0 ** bits
        if not bool(torch.isfinite(scaled).all()) or bool((scaled.abs() >= self.LIMIT).any()):
            raise FixedPointOverflow(self._range_message(what))
        return torch.round(scaled).to(torch.int64)

    def _range_message(self, what: str) -> str:
        return (f"{what} left the exact fixed-point range (|w| < {self.LIMIT / self.w_scale:.3g}, "
                f"|v| < {self.LIMIT / self.v_scale:.3g}) or are not finite: clip the weights, "
                f"or lower w_bits / v_bits")

    def _step_scale(self, t: int) -> torch.Tensor:
        """alpha_t on the weights' grid per velocity unit (a power-of-two shift: exact)."""
        return self.problem.alpha[t] * 2.0 ** (self.w_bits - self.v_bits)

    def _gain(self, t: int) -> float:
        return 1 - self.problem.beta[t].item()

    @classmethod
    def train(cls, problem: Problem, l2_coef: torch.Tensor, **bits: int) -> "ExactPath":
        """Fixed-point SGD from w_0; records distances[t-1] = |w_t - w_0| like FloatPath."""
        path = cls(problem, **bits)
        distances = []
        for t in range(problem.steps):
            w = path.w()
            g = problem.train_grad(w, t) + l2_coef * w
            # Checked every step: nothing is multiplied or shifted up after an out-of-range
            # value, so int64 never wraps into a wrong number.
            path.w_int, path.v_int, overflow, w_float = _descend(
                path.w_int, path.buffer.multiply(path.v_int, problem.n[t]), g, path._gain(t), path.v_scale,
                path._step_scale(t), path.w_scale)
            if bool(overflow):
                raise FixedPointOverflow(path._range_message(f"weights or velocities at step {t}"))
            path._w = (path.w_int, w_float.to(problem.dtype))
            distances.append(torch.linalg.vector_norm(path.w() - problem.w0))
        path.distances = torch.stack(distances).double().cpu() if distances else torch.zeros(0, dtype=torch.float64)
        return path

    def w(self) -> torch.Tensor:
        """The weights as floats (kept from the kernel that computed w_int, while it is current)."""
        if self._w is None or self._w[0] is not self.w_int:
            self._w = (self.w_int, (self.w_int.to(torch.float64) / self.w_scale).to(self.problem.dtype))
        return self._w[1]

    def v(self) -> torch.Tensor:
        if self._v is None or self._v[0] is not self.v_int:
            self._v = (self.v_int, (self.v_int.to(torch.float64) / self.v_scale).to(self.problem.dtype))
        return self._v[1]

    def undo_position(self, t: int) -> None:
        self.w_int, w_float = _undo_position(self.w_int, self.v_int, self._step_scale(t), self.w_scale)
        self._w = (self.w_int, w_float.to(self.problem.dtype))

    def undo_velocity(self, t: int, g: torch.Tensor) -> None:
        n, gain, buffer = self.problem.n[t], self._gain(t), self.buffer
        if (below := buffer.words_below(n)) is None:  # the momentum changed at this step
            self.v_int = buffer.divide(_add_gradient(self.v_int, g, gain, self.v_scale), n)
            return
        self.v_int, v, *state = _undo_velocity(self.v_int, g, gain, self.v_scale, buffer.x, buffer.top, below, n)
        buffer.divided(*state)
        self._v = (self.v_int, v.to(self.problem.dtype))

    def verify_round_trip(self) -> None:
        """After the last reverse step: w_0 and v_{-1} = 0 bit for bit and the buffer emptied.
        Anything else means a reverse step differed from its forward step (a gradient that is
        not the training step's bit for bit, a nondeterministic kernel, a corrupted buffer), so
        the hypergradient accumulated along the way belongs to no trajectory."""
        wrong = {"w": int((self.w_int != self.w_start).sum()), "v": int(self.v_int.count_nonzero()),
                 "buffer": self.buffer.elements_off_start()}
        if any(wrong.values()):
            raise ReversalError(
                "exact reversal did not return to the start (elements off: "
                + ", ".join(f"{k} {n}" for k, n in wrong.items()) + f", of {self.problem.numel}): the reverse "
                "pass recomputed a different step than training did (gradient not bit-identical, "
                "nondeterministic kernel, or a corrupted buffer); no hypergradient is returned")


class StoredPath(_ForwardStepsOneToOne):
    """A short stretch of training kept in memory (the adaptive method's last M steps): undoing
    a step just restores the stored state, so the reverse pass is exact by construction.

    `ws[t]` is w_t for t = 0..M and `vs[t]` is v_{t-1} for t = 0..M (vs[0] = v before the stretch)."""

    def __init__(self, problem: Problem, ws: list[torch.Tensor], vs: list[torch.Tensor]):
        assert len(ws) == len(vs) == problem.steps + 1, "one state more than steps"
        self.problem, self.ws, self.vs = problem, ws, vs
        self._w = self._v = problem.steps  # at w_T and v_{T-1}

    @classmethod
    def train(cls, problem: Problem, l2_coef: torch.Tensor) -> "StoredPath":
        ws, vs = [problem.w0], [problem.v0]
        for t in range(problem.steps):
            g = problem.train_grad(ws[-1], t) + l2_coef * ws[-1]
            beta = problem.beta[t].item()
            vs.append(beta * vs[-1] - (1 - beta) * g)
            ws.append(ws[-1] + problem.alpha_at(t) * vs[-1])
        return cls(problem, ws, vs)

    def w(self) -> torch.Tensor:
        return self.ws[self._w]

    def v(self) -> torch.Tensor:
        return self.vs[self._v]

    def undo_position(self, t: int) -> None:
        self._w = t

    def undo_velocity(self, t: int, g: torch.Tensor) -> None:
        self._v = t
