"""Exact multiplication of fixed-point velocities by beta = n/d, with the lost bits kept.

`v * n / d` destroys information (about log2(d/n) bits per element). Following Maclaurin et
al. (2015) the remainder is stored and recovered later, but as range-ANS style bits-back
coding instead of unbounded integers (algorithms §4): each element keeps a state `x` in
[L, L * 2^16) with L = n * 2^16 (an int64 tensor), and spills 16-bit words to a dense
stack [W, P] of int16 (word-major). Every operation is a vectorised tensor op, so it runs on
CPU and CUDA alike, and memory stays within a few percent of T * P * log2(d/n) bits. While n
stays the same (every step but a change of momentum) a multiply or divide is one fused kernel
(`fused`) and one write or read of the stack.

Forward `multiply(v, n)`:  r = v mod d; v = v div d; spill words while x >= L (one, unless n
changed); x = x * 2^16 + r; u = x mod n; x = x div n; where x < L read a word back;
v = v * n + u.  `divide(v, n)` is its exact mirror image.
"""
from __future__ import annotations

import math

import torch

from pipeline.hypergrad.fused import fused

WORD_BITS = 16
D = 1 << WORD_BITS  # the denominator of every beta, and the word size
MASK = D - 1
READ_THRESHOLD = D * D  # states at or above it were renormalised by a read (disjoint ranges)


def rational_beta(beta: float) -> int:
    """Numerator n of the rational n / 2^16 the exact run uses for `beta`: the nearest one at or
    above it (n >= 1: reversal divides by it). Idempotent, so a problem built from another's
    momenta follows the same trajectory."""
    if not 0.0 <= beta < 1.0 - 1.0 / D:
        raise ValueError(f"momentum {beta} must lie in [0, 1 - 2^-16) for exact reversal")
    return max(1, math.ceil(beta * D))


def _floor_divmod(x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x div n, x mod n), rounding down, for |x| < 2^62 and 1 <= n <= 2^16, in vectorisable ops
    (int64 division is not): the float64 quotient is within 2^10 / n + 1 of the true one, so the
    remainder left by it is exact in float64 and its own quotient is off by at most one (upwards)."""
    q = torch.floor(x.to(torch.float64) / n).to(torch.int64)
    q = q + torch.floor((x - q * n).to(torch.float64) / n).to(torch.int64)
    under = (x - q * n < 0).long()
    q = q - under
    return q, x - q * n


def _flat_index(top: torch.Tensor) -> torch.Tensor:
    """Each element's slot at height `top` in the flattened word-major [W, P] stack."""
    return top * top.shape[0] + torch.arange(top.shape[0], device=top.device)


@fused
def _multiply_same_n(v, x, top, n: int):
    """`multiply` while n is unchanged: one word spills, and a word read back is the one just
    spilled, so the stack is only written: `word` at `push_at` (as the two-pass version leaves it).
    Returns v * n / D, the state, the top, the word (int32: int16 does not vectorise), where it
    goes, and where the next `divide` reads."""
    word = x & MASK
    q, u = _floor_divmod((x - word) | (v & MASK), n)
    read = q < n * D
    new_top = top + 1 - read.long()
    return ((v >> WORD_BITS) * n + u, torch.where(read, (q << WORD_BITS) | word, q), new_top,
            word.int(), _flat_index(top), _flat_index((new_top - 1).clamp(min=0)))


@fused
def _divide_same_n(v, x, top, below, n: int):
    """`divide` while n is unchanged, mirroring `_multiply_same_n`: a word its read-back undo
    spills is read straight back, so the stack is only read (`below`: every element's top word)."""
    q, u = _floor_divmod(v, n)
    read = x >= READ_THRESHOLD
    x_up = torch.where(read, x >> WORD_BITS, x) * n + u
    word = torch.where(read, x & MASK, below.long() & MASK)
    new_top = top + read.long() - 1
    return ((q << WORD_BITS) | (x_up & MASK), (x_up & ~MASK) | word, new_top,
            _flat_index((new_top - 1).clamp(min=0)))


class BitsBackBuffer:
    """The information buffer of one flat tensor of P fixed-point velocities."""

    SEED_WORDS = 2  # a switch of n can read one word more than it spilled: never from an empty stack

    START_BITS = WORD_BITS * SEED_WORDS + 31  # information at the start: seed words and x = 2^31
    ROUNDING_BITS = 3e-5  # a pop loses at most log2(1 / (1 - n/x)) < 2.2e-5 bits to flooring

    N_START = D // 2  # the state starts at L for n = 2^15: any first n is a valid switch

    def __init__(self, numel: int, device: torch.device | str = "cpu"):
        self.n_prev = self.N_START
        self.x = torch.full((numel,), self.N_START * D, dtype=torch.int64, device=device)
        self.top = torch.full((numel,), self.SEED_WORDS, dtype=torch.int64, device=device)
        # Word-major [W, P]: element p's k-th word at stack[k, p]. Elements' tops stay close, so a
        # push or pop of all P elements touches a few contiguous rows (6x faster than [P, W] on CPU).
        self.stack = torch.zeros(self.SEED_WORDS, numel, dtype=torch.int16, device=device)
        # Host-side bound on the information 16 * top + log2 x: the stack grows without a device sync.
        self.bits_bound = float(self.START_BITS)
        self._history: list[tuple[int, float]] = []  # (n_prev, bits_bound) per step, for the reverse
        self._pop_at: torch.Tensor | None = None  # flat index of every top word, when known

    # -- the stack ---------------------------------------------------------------------------
    def _reserve(self, n: int) -> None:
        """Grow the stack before any element could overflow it: after this step x >= n * 2^16,
        so top <= (bits - log2(n * 2^16)) / 16; during it the spills before the read are in
        flight (one word, more when n falls)."""
        in_flight = 1 + max(0, math.ceil(math.log2(self.n_prev / n) / WORD_BITS))
        needed = math.ceil((self.bits_bound - math.log2(n * D)) / WORD_BITS) + 1 + in_flight
        width = self.stack.shape[0]
        if needed > width:
            grow = max(needed - width, 2, width // 50)  # few copies, under 2% slack
            pad = torch.zeros(grow, self.stack.shape[1], dtype=torch.int16, device=self.stack.device)
            self.stack = torch.cat([self.stack, pad], dim=0)

    def _push(self, word: torch.Tensor, where: torch.Tensor | None = None) -> None:
        self.stack.scatter_(0, self.top[None, :], word.to(torch.int16)[None, :])
        self.top += 1 if where is None else where

    def _pop(self, where: torch.Tensor | None = None) -> torch.Tensor:
        if where is not None:
            self.top -= where
            index = self.top.clamp(min=0)
        else:
            self.top -= 1
            index = self.top
        return self.stack.gather(0, index[None, :])[0].long() & MASK

    def _spill_below(self, limit: int, switch: bool) -> None:
        """Spill low words until x < limit: exactly one when n is unchanged."""
        if not switch:
            self._push(self.x & MASK)
            self.x >>= WORD_BITS
            return
        while bool((over := self.x >= limit).any()):
            self._push(self.x & MASK, over.long())
            self.x = torch.where(over, self.x >> WORD_BITS, self.x)

    def _unspill_to(self, limit: int, switch: bool) -> None:
        if not switch:
            self.x = (self.x << WORD_BITS) | self._pop()
            return
        while bool((under := self.x < limit).any()):
            word = self._pop(under.long())
            self.x = torch.where(under, (self.x << WORD_BITS) | word, self.x)

    # -- the arithmetic ----------------------------------------------------------------------
    def multiply(self, v: torch.Tensor, n: int) -> torch.Tensor:
        """v * n / 2^16 rounded down, exactly invertible by `divide` (v: int64, any shape)."""
        shape, v = v.shape, v.reshape(-1)
        self._history.append((self.n_prev, self.bits_bound))
        self.bits_bound += WORD_BITS - math.log2(n) + self.ROUNDING_BITS
        self._reserve(n)
        if n == self.n_prev:
            v, self.x, self.top, word, push_at, self._pop_at = _multiply_same_n(v, self.x, self.top, n)
            self.stack.view(-1).index_copy_(0, push_at, word.to(torch.int16))
            return v.reshape(shape)
        self._pop_at = None
        low = n * D
        r, v = v & MASK, v >> WORD_BITS
        self._spill_below(low, switch=n != self.n_prev)
        self.x = (self.x << WORD_BITS) | r
        self.x, u = _floor_divmod(self.x, n)
        read = self.x < low
        word = self._pop(read.long())
        self.x = torch.where(read, (self.x << WORD_BITS) | word, self.x)
        self.n_prev = n
        return (v * n + u).reshape(shape)

    def divide(self, v: torch.Tensor, n: int) -> torch.Tensor:
        """Undo the last `multiply(·, n)`: returns the v it was given, bit for bit."""
        shape, v = v.shape, v.reshape(-1)
        if (below := self.words_below(n)) is not None:
            v, *state = _divide_same_n(v, self.x, self.top, below, n)
            self.divided(*state)
            return v.reshape(shape)
        n_prev, self.bits_bound = self._history.pop()
        self._pop_at = None
        v, u = _floor_divmod(v, n)
        read = self.x >= READ_THRESHOLD
        self._push(self.x & MASK, read.long())
        self.x = torch.where(read, self.x >> WORD_BITS, self.x)
        self.x = self.x * n + u
        r, self.x = self.x & MASK, self.x >> WORD_BITS
        self._unspill_to(n_prev * D, switch=n != n_prev)
        self.n_prev = n_prev
        return ((v << WORD_BITS) | r).reshape(shape)

    # -- a caller's own fused divide: its kernel ends in `_divide_same_n` ---------------------
    def words_below(self, n: int) -> torch.Tensor | None:
        """Every element's top word, for `_divide_same_n` undoing a `multiply(·, n)` that kept n;
        None when that multiply changed n (then only `divide` can undo it)."""
        if self._history[-1][0] != n:
            return None
        pop_at = _flat_index((self.top - 1).clamp(min=0)) if self._pop_at is None else self._pop_at
        return self.stack.view(-1).index_select(0, pop_at).int()

    def divided(self, x: torch.Tensor, top: torch.Tensor, pop_at: torch.Tensor) -> None:
        """Take the state `_divide_same_n` returned after `words_below`."""
        self.bits_bound = self._history.pop()[1]
        self.x, self.top, self._pop_at = x, top, pop_at

    def elements_off_start(self) -> int:
        """How many elements' state, stack top or seed words differ from the initial ones (0
        after a full round trip of multiplies and divides)."""
        if self._history or self.n_prev != self.N_START:
            return self.x.numel()
        off = (self.x != self.N_START * D) | (self.top != self.SEED_WORDS)
        return int((off | (self.stack[:self.SEED_WORDS] != 0).any(0)).sum())

    # -- accounting --------------------------------------------------------------------------
    def stored_bits(self) -> float:
        """Mean information added per element: 16 * stack words + log2 x, less the start."""
        return (WORD_BITS * self.top.double() + torch.log2(self.x.double())).mean().item() - self.START_BITS

    def allocated_bits(self) -> float:
        """Memory the buffer occupies per element: the stack row, the state x and the top index."""
        return WORD_BITS * self.stack.shape[0] + 64 + 64
