"""Hypergradient engine benchmarks (issue: exact reverse-mode hypergradients). Writes JSON.

  buffer     bits per element per step of the bits-back buffer vs the minimum log2(d/n),
             MNIST MLP 784-50-50-50-10, T = 20,000, beta 0.9 and 0.95 (goal <= 1.05x)
  reverse    one exact reverse step / one float reverse step (goal <= 1.25), one reverse
             step / one forward step for the MLP and DenseNet-40 (goal <= 4 on GPU), and the
             exact pass's round-trip check as a share of the pass (goal < 1%)
  unrolled   exact vs unrolled at T = 2,000 on the MNIST MLP: peak memory (goal >= 10x less)
             and time (goal <= 1.5x), each measured in a fresh process
  exactness  exact vs unrolled, relative errors per HVP implementation at T = 300 (float64, MLP
             and a small DenseNet with BatchNorm and dropout), and the round-trip check's share
  hvp        double backward vs forward-over-reverse per model: the faster one is what to
             set as `hvp` in params.yaml on this device (the benchmark changes no setting)

    python bench/hypergrad.py [--device auto] [--quick] [--hvp double_backward]
"""
from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
import statistics
import tempfile
import time
from pathlib import Path

import click
import torch

from pipeline import data
from pipeline.config import DataConfig
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import ExactPath, FloatPath, Problem, hypergradient
from pipeline.hypergrad.bitsback import D
from pipeline.hypergrad.hvp import DEFAULT_HVP, HVP_METHODS
from pipeline.hypergrad.reverse import reverse
from pipeline.models import MLP, DenseNet
from pipeline.training import setup_device

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


PREPARED = Path(tempfile.gettempdir()) / "gbhpo-bench-mnist5k"


def mnist_problem(steps: int, beta: float, device: torch.device, batch: int = 100) -> Problem:
    if not (PREPARED / "info.json").exists():  # prepared once, so memory probes see no loader peak
        data.prepare(DataConfig(source="mnist5k", val_size=1000, test_size=1000), PREPARED)
    (x, y), (vx, vy) = data.load_split(PREPARED, "train", device), data.load_split(PREPARED, "val", device)
    torch.manual_seed(0)
    return Problem(MLP().to(device), x, y, vx[:500], vy[:500], alpha=torch.full((steps,), 0.5),
                   beta=torch.full((steps,), beta), batch_size=batch, seed=0)


def densenet_problem(steps: int, device: torch.device, depth: int = 40) -> Problem:
    torch.manual_seed(0)
    shape = (3, 32, 32) if device.type == "cuda" else (1, 8, 8)  # CIFAR-shaped where it is affordable
    x, vx = torch.randn(64 * steps, *shape, device=device), torch.randn(64, *shape, device=device)
    y, vy = torch.randint(0, 10, (64 * steps,), device=device), torch.randint(0, 10, (64,), device=device)
    return Problem(DenseNet(depth, in_channels=shape[0]).to(device), x, y, vx, vy, alpha=torch.full((steps,), 0.5),
                   beta=torch.full((steps,), 0.9), batch_size=64, seed=0)


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def bench_buffer(device: torch.device, steps: int) -> list[dict]:
    out = []
    for beta in (0.9, 0.95):
        problem = mnist_problem(steps, beta, device)
        path = ExactPath.train(problem, problem.l2_coefficients(None))
        minimum = math.log2(D / problem.n[0])
        buf = path.buffer
        out.append({"beta": beta, "steps": steps, "params": problem.numel,
                    "minimum_bits_per_step": round(minimum, 5),
                    "stored_bits_per_step": round(buf.stored_bits() / steps, 5),
                    "stored_over_minimum": round(buf.stored_bits() / steps / minimum, 4),
                    "allocated_bits_per_step": round(buf.allocated_bits() / steps, 5),
                    "allocated_over_minimum": round(buf.allocated_bits() / steps / minimum, 4)})
    return out


def bench_reverse(device: torch.device, problem: Problem, name: str, hvp_name: str) -> dict:
    coef = problem.l2_coefficients(None)
    forward = timed(lambda: ExactPath.train(problem, coef), device) / problem.steps
    float_forward = timed(lambda: FloatPath.train(problem, coef), device) / problem.steps
    hvp = HVP_METHODS[hvp_name]
    exact_path, float_path = ExactPath.train(problem, coef), FloatPath.train(problem, coef)
    exact = timed(lambda: reverse(problem, exact_path, None, hvp), device) / problem.steps
    plain = timed(lambda: reverse(problem, float_path, None, hvp), device) / problem.steps
    check = statistics.median(timed(exact_path.verify_round_trip, device) for _ in range(5))  # back at w_0 now
    return {"model": name, "steps": problem.steps, "params": problem.numel,
            "exact_forward_step_ms": round(1e3 * forward, 3), "float_forward_step_ms": round(1e3 * float_forward, 3),
            "exact_reverse_step_ms": round(1e3 * exact, 3), "float_reverse_step_ms": round(1e3 * plain, 3),
            "exact_over_float_reverse": round(exact / plain, 3), "hvp": hvp_name,
            "round_trip_check_ms": round(1e3 * check, 3),
            "round_trip_check_share_of_pass": round(check / (exact * problem.steps), 6),
            "reverse_over_forward": round(exact / forward, 3)}


def _unrolled_child(method: str, steps: int, device: str, queue) -> None:
    dev = torch.device(device)
    problem, warm_up = mnist_problem(steps, 0.9, dev), mnist_problem(2, 0.9, dev)
    l2 = HyperSpace.l2(problem.model, -4.0, "unit", dtype=problem.dtype, device=dev)
    hypergradient(warm_up, l2, method)  # lazy initialisation off the books, at a negligible peak
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    held = {}

    def work():
        if method == "unrolled":
            hypergradient(problem, l2, "unrolled")
            return
        path = ExactPath.train(problem, problem.l2_coefficients(l2))
        buf = path.buffer  # what exact reversal keeps besides the model: the buffer and w, v
        held["bytes"] = 2 * buf.stack.numel() + 8 * (buf.x.numel() + buf.top.numel()) + 16 * problem.numel
        reverse(problem, path, l2, HVP_METHODS[DEFAULT_HVP])

    seconds = timed(work, dev)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else 1024 * (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base))
    queue.put({"seconds": seconds, "peak_bytes": max(peak, held.get("bytes", 0)), "held_bytes": held.get("bytes")})


def bench_unrolled(device: torch.device, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    mnist_problem(1, 0.9, torch.device("cpu"))  # prepare the data in this process
    result = {"steps": steps}
    for method in ("unrolled", "exact"):
        queue = ctx.Queue()
        proc = ctx.Process(target=_unrolled_child, args=(method, steps, str(device), queue))
        proc.start()
        result[method] = queue.get()
        proc.join()
    result["memory_ratio_unrolled_over_exact"] = round(
        result["unrolled"]["peak_bytes"] / max(result["exact"]["peak_bytes"], 1), 2)
    result["time_ratio_exact_over_unrolled"] = round(result["exact"]["seconds"] / result["unrolled"]["seconds"], 3)
    result["note"] = ("CPU peak: growth of the process' max RSS during the run after a 2-step warm-up; for exact "
                      "at least the bytes its buffer, w and v hold at the end of the forward pass")
    return result


def bench_exactness(device: torch.device, steps: int) -> list[dict]:
    """Relative errors of exact against unrolled (d log10 L2, d alpha, d beta, d w_0), layer sharing."""
    out = []
    for name in ("mlp", "densenet"):
        torch.manual_seed(0)
        model = (MLP((12, 10, 10, 4)) if name == "mlp" else  # small float64 models: unrolled keeps every graph
                 DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1)).to(device, torch.float64)
        shape, classes = ((12,), 4) if name == "mlp" else ((1, 8, 8), 10)
        x, vx = (torch.randn(n, *shape, dtype=torch.float64, device=device) for n in (64, 32))
        y, vy = (torch.randint(0, classes, (n,), device=device) for n in (64, 32))
        problem = Problem(model, x, y, vx, vy, alpha=torch.full((steps,), 0.3 if name == "mlp" else 0.1,
                          dtype=torch.float64), beta=torch.full((steps,), 0.9, dtype=torch.float64),
                          batch_size=16, seed=0)
        l2 = HyperSpace.l2(problem.model, -2.0, "layer", device=device)
        reference = hypergradient(problem, l2, "unrolled")
        flat = lambda r: torch.cat([v.reshape(-1) for v in r["log10_l2"].values()])
        for hvp_name, hvp in HVP_METHODS.items():
            path, got = ExactPath.train(problem, problem.l2_coefficients(l2)), {}
            seconds = timed(lambda: got.update(reverse(problem, path, l2, hvp)), device)  # checks its round trip
            check = timed(path.verify_round_trip, device)  # the same check again, alone
            rel = {k: ((got[k] - reference[k]).norm() / reference[k].norm()).item() for k in ("alpha", "beta", "w0")}
            rel["log10_l2"] = ((flat(got) - flat(reference)).norm() / flat(reference).norm()).item()
            out.append({"model": name, "steps": steps, "hvp": hvp_name, "relative_error": rel,
                        "reverse_pass_s": round(seconds, 3), "round_trip_check_share": check / seconds})
    return out


def bench_hvp(device: torch.device, problem: Problem, name: str, repeats: int = 5) -> dict:
    w, dv = problem.w0, torch.randn_like(problem.w0)
    times = {}
    for method, fn in {"gradient": lambda p, w_, t, d: p.train_grad(w_, t), **HVP_METHODS}.items():
        fn(problem, w, 0, dv)
        times[method] = statistics.median(timed(lambda: fn(problem, w, 0, dv), device) for _ in range(repeats))
    gradient = times.pop("gradient")
    fastest = min(times, key=times.get)
    return {"model": name, "gradient_ms": round(1e3 * gradient, 3), **{f"{k}_ms": round(1e3 * v, 3) for k, v in times.items()},
            "fastest": fastest, "hvp_cost_in_gradients": round(times[fastest] / gradient, 2)}  # work.hvp_cost


@click.command(help=__doc__)
@click.option("--device", default="auto", show_default=True)
@click.option("--quick", is_flag=True, help="Shorter runs (smoke test of the script).")
@click.option("--only", type=click.Choice(["all", "exactness", "hvp", "buffer", "reverse", "unrolled"]), default="all",
              show_default=True, help="Run one part (its results replace that part in the JSON).")
@click.option("--hvp", "hvp_name", type=click.Choice(list(HVP_METHODS)), default=DEFAULT_HVP, show_default=True,
              help="Hessian-vector product of the timed reverse passes.")
@click.option("--out", default="bench/results/hypergrad.json", show_default=True)
def main(device: str, quick: bool, only: str, hvp_name: str, out: str) -> None:
    dev = setup_device(device)
    scale = 10 if quick else 1
    results = json.loads(Path(out).read_text()) if only != "all" and Path(out).exists() else {}
    results.update({"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads()})
    if only in ("all", "exactness"):
        results["exactness"] = bench_exactness(dev, 300 // scale)
    if only in ("all", "hvp"):
        hvp = [bench_hvp(dev, mnist_problem(2, 0.9, dev), "mnist_mlp"),
               bench_hvp(dev, densenet_problem(2, dev), "densenet40"),
               bench_hvp(dev, densenet_problem(2, dev, depth=10), "densenet10")]  # the embedded default's
        results.update(hvp=hvp, hvp_setting_for_this_device=hvp[1]["fastest"])  # DenseNet-40: where paper-scale time goes
    if only in ("all", "buffer"):
        results["buffer"] = bench_buffer(dev, 20_000 // scale)
    if only in ("all", "reverse"):
        results["reverse"] = [bench_reverse(dev, mnist_problem(200 // scale, 0.9, dev), "mnist_mlp", hvp_name),
                              bench_reverse(dev, densenet_problem(4, dev), "densenet40", hvp_name)]
    if only in ("all", "unrolled"):
        results["unrolled_vs_exact"] = bench_unrolled(dev, 2_000 // scale)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    click.echo(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
