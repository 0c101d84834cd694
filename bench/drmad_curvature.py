"""Why does DrMAD over- or undershoot on the quality MLP? Curvature on the real path and on the line.

The reverse recursion multiplies (dw, dv) by the adjoint of one momentum step per reverse step.
For curvature lambda that map has eigenvalues mu with mu^2 - (1 + beta - a lambda) mu + beta = 0,
a = alpha (1 - beta): |mu| > 1 (growth) when a lambda > 2 (1 + beta) (the stability edge) or
lambda < 0. For a quality run's first meta-iteration (its protocol, its forward length T) this
measures:
  - the extreme Hessian eigenvalues of step t's loss (L2 included) at the real iterate w_t and at
    the line point (t / T) w_T + (1 - t / T) w_0, by Lanczos (scipy `eigsh` on the HVP as a
    LinearOperator), each with its residual |H v - lambda v| / |v| so that non-converged
    values show;
  - |dw| along the reverse pass of exact reversal and of DrMAD with S = T and with the S the
    quality stage used (the protocol's heuristic), so growth per reverse step can be set
    against S.

    python bench/drmad_curvature.py [--variant thesis-200] [--points 5]
        -> bench/results/drmad_curvature_<run>.json
"""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

from pipeline.config import load_params
from pipeline.hypergrad import ExactPath, FloatPath
from pipeline.hypergrad.drmad import LinePath, heuristic_steps, step_map
from pipeline.hypergrad.hvp import double_backward
from pipeline.hypergrad.reverse import reverse
from pipeline.io import write_json
from pipeline.experiments.quality import build_problem, load_data, penalty
from pipeline.training import setup_device

OUT = Path(__file__).with_name("results")


def extreme_eigenpairs(problem, w, t, coef, tol: float = 1e-6) -> dict:
    """Largest and smallest eigenvalue of step t's Hessian at w, with their residuals."""
    def matvec(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v).reshape(-1)).to(w.dtype)
        return (double_backward(problem, w, t, x)[0] + coef * x).numpy()

    op = LinearOperator((w.numel(), w.numel()), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(t).standard_normal(w.numel())
    out = {}
    for which, name in (("LA", "max"), ("SA", "min")):
        values, vectors = eigsh(op, k=1, which=which, tol=tol, v0=v0, ncv=40, maxiter=5000)
        vec = vectors[:, 0]
        out[f"lambda_{name}"] = float(values[0])
        out[f"residual_{name}"] = float(np.linalg.norm(matvec(vec) - values[0] * vec) / np.linalg.norm(vec))
    return out


def growth(lam: float, alpha: float, beta: float) -> float:
    """Spectral radius of one momentum step's linearisation at curvature lam."""
    a = alpha * (1 - beta)
    roots = np.linalg.eigvals(np.array([[1 + beta - a * lam, -beta], [1.0, 0.0]]))
    return float(np.abs(roots).max())


@click.command(help=__doc__)
@click.option("--variant", "name", default="thesis-200", show_default=True, help="A key of quality.variants.")
@click.option("--points", default=5, show_default=True, help="Steps t at which eigenvalues are measured.")
def main(name: str, points: int) -> None:
    params = load_params()
    cfg = params.quality
    protocol, steps = cfg.protocol(name), cfg.variants[name].steps
    torch.set_num_threads(1)  # a small model: one thread is the faster on shared cores
    device = setup_device("cpu")
    splits, info = load_data(cfg, protocol)
    problem = build_problem(cfg, protocol, params.seed, steps, splits, info, device)
    l2 = penalty(problem, protocol, device)
    coef = problem.l2_coefficients(l2)
    floats = FloatPath.train(problem, coef, keep_every=1)
    w_T, alpha, beta = floats.w(), protocol.alpha, problem.beta[0].item()
    rows = []
    for t in sorted({round(i * steps / (points + 1)) for i in range(1, points + 1)}):
        row = {"t": t}
        on_line = (t / steps) * w_T + (1 - t / steps) * problem.w0
        for where, w in (("path", floats.iterates[t].to(problem.dtype)), ("line", on_line)):
            pairs = extreme_eigenpairs(problem, w, t, coef)
            row |= {f"{where}_{k}": v for k, v in pairs.items()}
            row[f"{where}_growth_per_step"] = max(growth(pairs["lambda_max"], alpha, beta),
                                                  growth(pairs["lambda_min"], alpha, beta))
        rows.append(row)
        click.echo(row)

    def dw_norms(path) -> list[float]:
        return reverse(problem, path, l2, double_backward, record=True)["trace"]["dw_norm"]

    heuristic = min(heuristic_steps(floats.distances, protocol.multiplier), cfg.max_reverse_steps)
    exact = dw_norms(ExactPath.train(problem, coef))
    lines = {s: dw_norms(LinePath(problem.w0, w_T, s, step_map(cfg.step_map, s, steps, floats.distances)))
             for s in sorted({heuristic, steps})}
    every = max(1, steps // 20)
    result = {"run": name, "protocol": cfg.variants[name].protocol, "forward_steps": steps, "alpha": alpha,
              "beta": beta, "edge": 2 * (1 + beta) / (alpha * (1 - beta)), "eigenvalues": rows,
              "heuristic_reverse_steps": heuristic, "exact_dw_norm": exact[::every] + exact[-1:],
              "line_dw_norm": {str(s): d[:: max(1, s // 20)] + d[-1:] for s, d in lines.items()},
              "final_dw_ratio_line_over_exact": {str(s): d[-1] / exact[-1] for s, d in lines.items()}}
    write_json(OUT / f"drmad_curvature_{name}.json", result)
    click.echo(f"edge {result['edge']:.1f}; S heuristic {heuristic}; final |dw| line / exact = "
               f"{result['final_dw_ratio_line_over_exact']}")


if __name__ == "__main__":
    main()
