"""What the exact kernels' first compile costs a process, with an empty or a warm inductor cache
and with or without inductor's vector-ISA test builds. Writes JSON.

Each measurement is a fresh process that takes one exact hypergradient of the quality MLP
(784-50-50-50-10, T steps back and forth) twice with PIPELINE_COMPILE=1: the first call
compiles the kernels, the second runs them compiled, so first - second is the compile. `isa`:
`flags` is the pipeline's way (`fused._isa_from_cpu_flags`: trust the CPU's flags), `probe` is
inductor's default (test-build every vector ISA the CPU lists, then take the first). `cache`:
`empty` is a fresh TORCHINDUCTOR_CACHE_DIR per process (a fresh machine), `warm` one folder
that an unrecorded process fills first. The settings alternate within each round.

\b
    python bench/compile_cost.py --repeats 2
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]


def child(isa: str, steps: int) -> None:
    """In the measured process: two compiled exact hypergradients; prints one JSON row."""
    import torch

    from pipeline.hypergrad import fused, hypergradient
    from pipeline.training import setup_device

    sys.path.insert(0, str(ROOT / "bench"))
    from hypergrad import mnist_problem

    if isa == "probe":
        fused._isa_from_cpu_flags = contextlib.nullcontext
    device = setup_device("cpu", 1)
    problem = mnist_problem(steps, 0.9, device)
    seconds = []
    for _ in range(2):
        started = time.perf_counter()
        hypergradient(problem, method="exact")
        seconds.append(time.perf_counter() - started)
    dynamo = sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))
    print(json.dumps({"first_s": round(seconds[0], 2), "second_s": round(seconds[1], 2),
                      "compile_s": round(seconds[0] - seconds[1], 2), "dynamo_compile_s": round(dynamo, 2)}))


def measure(isa: str, cache: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PIPELINE_COMPILE": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", isa, "--steps", str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@click.command(help=__doc__)
@click.option("--repeats", default=2, show_default=True, help="Rounds over the settings.")
@click.option("--steps", default=200, show_default=True, help="T of the measured hypergradient.")
@click.option("--isa", "isas", multiple=True, default=["flags", "probe"], show_default=True)
@click.option("--cache", "caches", multiple=True, default=["empty", "warm"], show_default=True)
@click.option("--child", "child_isa", hidden=True)
@click.option("--out", default="bench/results/compile_cost.json", show_default=True)
def main(repeats: int, steps: int, isas: tuple[str, ...], caches: tuple[str, ...], child_isa: str | None,
         out: str) -> None:
    if child_isa:
        return child(child_isa, steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compile-cost-") as scratch:
        warm = {isa: Path(scratch) / f"warm-{isa}" for isa in isas}
        for isa in isas if "warm" in caches else ():
            measure(isa, warm[isa], steps)  # fills the warm cache
        for round_, cache, isa in ((r, c, i) for r in range(repeats) for c in caches for i in isas):
            folder = Path(tempfile.mkdtemp(dir=scratch)) if cache == "empty" else warm[isa]
            rows.append({"round": round_, "cache": cache, "isa": isa, "steps": steps, **measure(isa, folder, steps)})
            print(json.dumps(rows[-1]), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
