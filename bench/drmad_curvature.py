"""Why DrMAD overshoots on the quality MLP: curvature on the straight line vs on the real path.

The reverse recursion multiplies (dw, dv) by the adjoint of one momentum step per reverse step.
For curvature lambda that map has eigenvalues mu with mu^2 - (1 + beta - a lambda) mu + beta = 0,
a = alpha (1 - beta): |mu| > 1 (growth) when a lambda > 2 (1 + beta) (the stability edge) or
lambda < 0. Which of the two makes DrMAD's straight line w_0 -> w_T grow where the real path
does not? This script measures, for the embedded quality stage's first meta-iteration at forward length T:
  - the extreme Hessian eigenvalues of step t's loss (power iteration on HVPs) at the real
    iterate w_t and at the line point (t / T) w_T + (1 - t / T) w_0 that DrMAD with S = T uses;
  - |dw| along the reverse pass of exact reversal and of DrMAD with S = T.

    python bench/drmad_curvature.py [--steps 200] [--points 9]   -> bench/results/drmad_curvature.json
"""
from __future__ import annotations

from pathlib import Path

import click
import torch

from pipeline import data, io
from pipeline.config import load_params
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import ExactPath, FloatPath
from pipeline.hypergrad.drmad import LinePath, step_map
from pipeline.hypergrad.hvp import double_backward
from pipeline.hypergrad.reverse import reverse
from pipeline.quality import build_problem
from pipeline.training import make_deterministic

OUT = Path(__file__).with_name("results") / "drmad_curvature.json"


def extreme_eigenvalues(problem, w, t, coef, iterations: int = 50) -> tuple[float, float]:
    """(largest, smallest) eigenvalue of step t's Hessian (L2 included) by two power iterations."""
    def hess(v):
        return double_backward(problem, w, t, v)[1] + coef * v

    def power(op):
        v = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(t))
        for _ in range(iterations):
            v = op(v)
            v = v / v.norm()
        return torch.dot(v, op(v)).item()

    top = power(hess)  # the largest magnitude; shifted by it, the spectrum's other end is largest
    other = power(lambda v: hess(v) - top * v) + top
    return max(top, other), min(top, other)


def growth(lam: float, alpha: float, beta: float) -> float:
    """Spectral radius of one momentum step's linearisation at curvature lam."""
    a = alpha * (1 - beta)
    roots = torch.linalg.eigvals(torch.tensor([[1 + beta - a * lam, -beta], [1.0, 0.0]], dtype=torch.float64))
    return roots.abs().max().item()


@click.command()
@click.option("--steps", default=200, show_default=True, help="Forward length T.")
@click.option("--points", default=9, show_default=True, help="Steps t at which eigenvalues are measured.")
def main(steps: int, points: int) -> None:
    params = load_params()
    cfg = params.quality
    make_deterministic()
    splits, meta = data.build(cfg.data)
    problem = build_problem(cfg, params.seed, steps, splits, meta, torch.device("cpu"))
    l2 = HyperSpace.l2(problem.model, cfg.log10_l2, "global")
    coef = problem.l2_coefficients(l2)
    floats = FloatPath.train(problem, coef, keep_every=1)
    w_T, beta = floats.w(), problem.beta[0].item()
    rows = []
    for t in sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)}):
        on_line = (t / steps) * w_T + (1 - t / steps) * problem.w0
        row = {"t": t}
        for where, w in (("path", floats.iterates[t].to(problem.dtype)), ("line", on_line)):
            top, bottom = extreme_eigenvalues(problem, w, t, coef)
            row |= {f"{where}_lambda_max": top, f"{where}_lambda_min": bottom,
                    f"{where}_growth": max(growth(top, cfg.alpha, beta), growth(bottom, cfg.alpha, beta))}
        rows.append(row)
        click.echo(row)

    def dw_norms(path) -> list[float]:
        return reverse(problem, path, l2, double_backward, record=True)["trace"]["dw_norm"]

    exact = dw_norms(ExactPath.train(problem, coef))
    line = dw_norms(LinePath(problem.w0, w_T, steps, step_map("same", steps, steps)))
    result = {"forward_steps": steps, "alpha": cfg.alpha, "beta": beta,
              "edge": 2 * (1 + beta) / (cfg.alpha * (1 - beta)), "eigenvalues": rows,
              "exact_dw_norm": exact[:: max(1, steps // 20)] + exact[-1:],
              "line_dw_norm": line[:: max(1, steps // 20)] + line[-1:],
              "final_dw_ratio_line_over_exact": line[-1] / exact[-1]}
    io.write_json(OUT, result)
    click.echo(f"edge {result['edge']:.1f}; final |dw| line / exact = {result['final_dw_ratio_line_over_exact']:.3g}")


if __name__ == "__main__":
    main()
