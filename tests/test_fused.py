"""Fused kernels of exact reversal: against an explicit per-element reference, and compiled
against eager bit for bit (whole hypergradients, float64 and float32)."""
import warnings

import pytest
import torch
from torch._inductor import config as inductor_config

from pipeline.hypergrad import fused, hypergradient
from pipeline.hypergrad.bitsback import D, MASK, READ_THRESHOLD, WORD_BITS, BitsBackBuffer, _floor_divmod, rational_beta
from tests.test_hypergrad import make_problem


@pytest.fixture(params=["compiled", "eager"])
def kernels(request, monkeypatch):
    monkeypatch.setenv("PIPELINE_COMPILE", "1" if request.param == "compiled" else "0")
    return request.param


class ElementwiseBuffer:
    """The bits-back coder of algorithms §4 one element at a time, in Python integers, with a
    list per element for its stack: what the vectorised buffer must reproduce."""

    def __init__(self, numel: int):
        self.x = [BitsBackBuffer.N_START * D] * numel
        self.stacks = [[0] * BitsBackBuffer.SEED_WORDS for _ in range(numel)]
        self.n_prev, self.history = BitsBackBuffer.N_START, []

    def multiply(self, v: list[int], n: int) -> list[int]:
        self.history.append(self.n_prev)
        out = []
        for p, value in enumerate(v):
            x, stack = self.x[p], self.stacks[p]
            while x >= n * D:  # spill
                stack.append(x & MASK)
                x >>= WORD_BITS
            x, u = divmod((x << WORD_BITS) | (value & MASK), n)
            if x < n * D:  # read back
                x = (x << WORD_BITS) | stack.pop()
            self.x[p] = x
            out.append((value >> WORD_BITS) * n + u)
        self.n_prev = n
        return out

    def divide(self, v: list[int], n: int) -> list[int]:
        n_prev = self.history.pop()
        out = []
        for p, value in enumerate(v):
            x, stack = self.x[p], self.stacks[p]
            q, u = divmod(value, n)
            if x >= READ_THRESHOLD:  # undo the read-back
                stack.append(x & MASK)
                x >>= WORD_BITS
            x = x * n + u
            r, x = x & MASK, x >> WORD_BITS
            while x < n_prev * D:  # undo the spills
                x = (x << WORD_BITS) | stack.pop()
            self.x[p] = x
            out.append((q << WORD_BITS) | r)
        self.n_prev = n_prev
        return out


def assert_same_state(buf: BitsBackBuffer, ref: ElementwiseBuffer):
    assert buf.x.tolist() == ref.x
    assert buf.top.tolist() == [len(s) for s in ref.stacks]
    words = (buf.stack.long() & MASK).T.tolist()
    assert all(words[p][:len(s)] == s for p, s in enumerate(ref.stacks))


def test_buffer_matches_the_elementwise_reference_step_by_step(kernels):
    """Runs of equal momenta (fused kernels) with changes between them (the general path), a tiny
    beta among them; every step's output, state and stack below the top are compared."""
    numel, gen = 40, torch.Generator().manual_seed(3)
    ns = ([rational_beta(0.9)] * 12 + [rational_beta(0.95)] * 6 + [rational_beta(0.5)] * 5
          + [rational_beta(0.004)] * 3 + [rational_beta(0.99)] * 8)
    buf, ref = BitsBackBuffer(numel), ElementwiseBuffer(numel)
    v = torch.randint(-2 ** 58, 2 ** 58, (numel,), generator=gen)
    values = v.tolist()
    for n in ns:
        v, values = buf.multiply(v, n), ref.multiply(values, n)
        assert v.tolist() == values
        assert_same_state(buf, ref)
    for n in reversed(ns):
        v, values = buf.divide(v, n), ref.divide(values, n)
        assert v.tolist() == values
        assert_same_state(buf, ref)
    assert buf.elements_off_start() == 0


@pytest.mark.parametrize("n", [1, 3, 255, 256, rational_beta(0.5), rational_beta(0.9), D - 1, D])
def test_floor_divmod_is_exact_over_the_whole_range(n):
    edges = [2 ** 62 - 1, -(2 ** 62) + 1, 2 ** 53 + 1, -(2 ** 53) - 1, 2 ** 48 - 1, n * 2 ** 40 - 1, -n, n - 1, 0, -1]
    gen = torch.Generator().manual_seed(n)
    x = torch.cat([torch.tensor(edges), torch.randint(-2 ** 62, 2 ** 62, (5000,), generator=gen)])
    q, r = _floor_divmod(x, n)
    assert q.tolist() == [a // n for a in x.tolist()] and r.tolist() == [a % n for a in x.tolist()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", ["exact", "float", "drmad"])
def test_compiled_kernels_give_the_eager_bits(method, dtype, monkeypatch):
    """The whole hypergradient (every fused kernel: exact steps, buffer, adjoint updates) with
    torch.compile on and off: bit for bit, and exact reversal checked its round trip both times."""
    def run(flag: str) -> dict:
        monkeypatch.setenv("PIPELINE_COMPILE", flag)
        betas = torch.tensor([0.8] * 20 + [0.9] * 20 + [0.95] * 20)  # three runs of equal momenta
        with warnings.catch_warnings():  # a kernel that fell back to eager would compare eager with eager
            warnings.filterwarnings("error", ".* runs eagerly", RuntimeWarning)
            return hypergradient(make_problem(steps=60, beta=betas, dtype=dtype), method=method, reverse_steps=20)

    compiled, eager = run("1"), run("0")
    for key in ("w0", "v0", "alpha", "beta"):
        if key in eager:
            assert torch.equal(compiled[key], eager[key]), key
    assert compiled["val_loss"] == eager["val_loss"]


def test_auto_compiles_large_kernels_after_their_warmup_calls(monkeypatch):
    """auto: a kernel runs eagerly for its first WARMUP_CALLS calls, then compiled; a small
    one never compiles; `1` compiles from the first call, `0` never."""
    compiled_calls = []

    def fake_compile(fn, **kwargs):
        return lambda *args: compiled_calls.append(args[0].numel()) or fn(*args)

    monkeypatch.setattr(fused.torch, "compile", fake_compile)
    monkeypatch.setattr(fused, "WARMUP_CALLS", 3)
    for mode, numel, expected in (("auto", fused.MIN_NUMEL, 2), ("auto", fused.MIN_NUMEL - 1, 0),
                                  ("1", 8, 5), ("0", fused.MIN_NUMEL, 0)):
        monkeypatch.setenv("PIPELINE_COMPILE", mode)
        compiled_calls.clear()
        kernel = fused.fused(lambda x: x + 1)
        x = torch.zeros(numel)
        for _ in range(5):
            assert torch.equal(kernel(x), x + 1)
        assert len(compiled_calls) == expected, (mode, numel)


@pytest.mark.parametrize("users", [None, False])
def test_first_compile_trusts_the_cpu_flags_unless_the_user_chose(users, monkeypatch):
    """The compiling call runs with inductor's ISA test builds off (seconds of gcc per ISA with an
    empty cache), later calls and the process's own setting are left alone."""
    seen = []

    def fake_compile(fn, **kwargs):
        return lambda *args: seen.append(inductor_config.cpp.vec_isa_ok) or fn(*args)

    monkeypatch.setattr(fused.torch, "compile", fake_compile)
    monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", users)
    monkeypatch.setenv("PIPELINE_COMPILE", "1")
    kernel, x = fused.fused(lambda x: x + 1), torch.zeros(4)
    for _ in range(3):
        kernel(x)
    assert seen == [True if users is None else users] + [users] * 2
    assert inductor_config.cpp.vec_isa_ok is users
