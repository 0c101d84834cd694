"""The information buffer on its own: exact round trips at the information minimum."""
import math

import pytest
import torch

from pipeline.hypergrad.bitsback import D, BitsBackBuffer, rational_beta


def round_trip(ns, numel=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    buf = BitsBackBuffer(numel)
    start = (buf.x.clone(), buf.top.clone(), buf.stack.clone())
    v0 = torch.randint(-2 ** 60, 2 ** 60, (numel,), generator=gen)
    v, kicks = v0.clone(), []
    for n in ns:  # multiply, then an integer "gradient" step that the reverse must undo too
        kicks.append(torch.randint(-2 ** 40, 2 ** 40, (numel,), generator=gen))
        v = buf.multiply(v, n) - kicks[-1]
    stored = buf.stored_bits()
    for n, kick in zip(reversed(ns), reversed(kicks)):
        v = buf.divide(v + kick, n)
    return v0, v, start, buf, stored


@pytest.mark.parametrize("beta", [0.5, 0.9, 0.95, 0.99])
def test_round_trip_is_exact_and_near_the_minimum(beta):
    n = rational_beta(beta)
    v0, v, (x, top, stack), buf, stored = round_trip([n] * 2000)
    assert torch.equal(v, v0)
    assert torch.equal(buf.x, x) and torch.equal(buf.top, top)
    assert torch.equal(buf.stack[:stack.shape[0]], stack)
    minimum = 2000 * math.log2(D / n)
    assert minimum <= stored <= 1.01 * minimum + 1


def test_changing_momenta_round_trip():
    betas = torch.rand(1500, generator=torch.Generator().manual_seed(1)) * 0.98 + 0.01
    v0, v, (x, top, _), buf, _ = round_trip([rational_beta(b) for b in betas.tolist()])
    assert torch.equal(v, v0) and torch.equal(buf.x, x) and torch.equal(buf.top, top)


def test_multiply_is_beta_times_v_up_to_the_replaced_low_word():
    buf = BitsBackBuffer(1000)
    v = torch.randint(-2 ** 45, 2 ** 45, (1000,))  # v * n must not overflow in the check itself
    n = rational_beta(0.9)
    assert ((buf.multiply(v, n) - v * n // D).abs() < n).all()


def test_rational_beta_is_close_and_refuses_one():
    assert abs(rational_beta(0.9) / D - 0.9) <= 1 / D
    for beta in (0.0, 0.5, 0.9, 0.95, 0.99):  # a rational maps to itself: problems built from others agree
        n = rational_beta(beta)
        assert rational_beta(n / D) == n and n >= 1
    with pytest.raises(ValueError, match="momentum"):
        rational_beta(1.0)
