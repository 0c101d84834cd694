"""Elementwise kernels of exact reversal, fused into one loop each by torch.compile.

An exact step is some 40 elementwise integer passes over the P weights; run one by one they
cost more than the step's gradient on a small model. `@fused` compiles a pure function of
tensors into a single kernel (inductor: vectorised C++ on CPU, Triton on CUDA) and runs it
eagerly where compiling is off or fails. Both give the same bits: the kernels do integer
arithmetic, and their few float operations (a product, a quotient, rounding) are single IEEE
operations that inductor neither reassociates nor contracts (its default C++ flags keep
`-fno-unsafe-math-optimizations -ffp-contract=off`; no kernel feeds a product into a sum).
The tests compare the two bit for bit.

PIPELINE_COMPILE: `auto` (default) compiles a kernel over at least MIN_NUMEL elements once it
has run WARMUP_CALLS times eagerly in this process: compiling costs about a second per kernel
with a warm inductor cache (several when cold), which smaller or shorter runs never earn back
(eager costs about a millisecond more per call at P = 45k). `1` compiles from the first call,
`0` never (no C compiler, or to rule compiling out).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Callable

import torch


MIN_NUMEL = 1 << 14
WARMUP_CALLS = 1000


def enabled(numel: int, calls: int) -> bool:
    """Whether a kernel's call number `calls` (0-based) over `numel` elements runs compiled."""
    mode = os.environ.get("PIPELINE_COMPILE", "auto")
    return mode == "1" or (mode != "0" and numel >= MIN_NUMEL and calls >= WARMUP_CALLS)


def _isa_from_cpu_flags():
    """Inductor compiles for the first vector ISA that the CPU's flags list, but first test-builds
    every listed one (AMX, three AVX-512 variants, AVX2: 12-15 s of gcc on a 2-core machine
    with an empty cache, once per cache folder); trust the flags instead. Where the compiler cannot
    build that ISA the compile fails and the kernel runs eagerly: the same bits, with a warning."""
    from torch._inductor import config

    return config.patch({"cpp.vec_isa_ok": True}) if config.cpp.vec_isa_ok is None else contextlib.nullcontext()


def fused(fn: Callable) -> Callable:
    compiled: list[Callable] = []  # filled on first use: compiling costs nothing until a kernel runs
    failed, calls = False, 0

    @functools.wraps(fn)
    def call(*args):
        nonlocal failed, calls
        calls += 1
        if failed or not enabled(args[0].numel(), calls - 1):
            return fn(*args)
        try:
            if compiled:
                return compiled[0](*args)
            # dynamic: one kernel for every P; ints and floats enter as arguments
            compiled.append(torch.compile(fn, dynamic=True, fullgraph=True))
            with _isa_from_cpu_flags():  # the first call compiles
                return compiled[0](*args)
        except Exception as error:  # no compiler, unsupported device: the eager kernel is the same maths
            failed = True
            warnings.warn(f"{fn.__name__} runs eagerly: torch.compile failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})", RuntimeWarning, stacklevel=2)
            return fn(*args)

    call.eager = fn
    return call
