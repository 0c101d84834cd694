"""The `trajectory` stage: what a training trajectory looks like (thesis figs 2.1-2.2).

DrMAD replaces the path from w_0 to w_T by a straight line; these figures show how far from a
line the quality study's MLP actually travels: the stored iterates on two random coordinates,
single coordinates against the iteration, and the top-2 principal components. `straightness`
= |w_T - w_0| / path length (1 for a straight line).
"""
from __future__ import annotations

import time

import pandas as pd
import torch

from pipeline import io, machine, plots
from pipeline.layout import TrajectoryOutputs
from pipeline.tracking import SILENT, Tracker
from pipeline.config import Params
from pipeline.hypergrad import FloatPath
from pipeline.quality_mlp import build_problem, load_data, penalty
from pipeline.training import setup_device

PICK_STREAM = 7  # seed stream of the random coordinates


def projections(iterates: torch.Tensor, iterations: list[int], picks: torch.Tensor) -> tuple[pd.DataFrame, list[float]]:
    """Long table (iteration, projection, x, y) on two picked coordinates and on the top-2
    principal components of the centred iterates, and the variance share of those two."""
    centred = iterates - iterates.mean(0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    pcs = u[:, :2] * s[:2]
    explained = (s[:2] ** 2 / (s ** 2).sum()).tolist()
    rows = [{"iteration": it, "projection": "random", "x": iterates[k, picks[0]].item(), "y": iterates[k, picks[1]].item()}
            for k, it in enumerate(iterations)]
    rows += [{"iteration": it, "projection": "pca", "x": pcs[k, 0].item(), "y": pcs[k, 1].item()}
             for k, it in enumerate(iterations)]
    return pd.DataFrame(rows), explained


def run(params: Params, paths: TrajectoryOutputs, tracker: Tracker = SILENT) -> dict:
    cfg, q = params.trajectory, params.quality
    start = time.perf_counter()
    protocol = q.protocols[cfg.protocol]
    splits, info = load_data(q, protocol)
    problem = build_problem(q, protocol, params.seed, cfg.steps, splits, info, setup_device(params.device, params.threads))
    l2 = penalty(problem, protocol, problem.x.device)
    trained = FloatPath.train(problem, problem.l2_coefficients(l2), keep_every=cfg.every)
    iterates = torch.stack(trained.iterates).double()
    iterations = [k * cfg.every for k in range(len(iterates))]
    gen = torch.Generator().manual_seed(params.seed + PICK_STREAM)
    picks = torch.randperm(iterates.shape[1], generator=gen)[: max(2, cfg.coordinates)]
    path, explained = projections(iterates, iterations, picks)
    coordinates = pd.DataFrame([{"iteration": it, "coordinate": int(c), "value": iterates[k, c].item()}
                                for c in picks[: cfg.coordinates] for k, it in enumerate(iterations)])
    steps = (iterates[1:] - iterates[:-1]).norm(dim=1)
    metrics = {"steps": cfg.steps, "iterates_kept": len(iterates),
               "straightness": round(((iterates[-1] - iterates[0]).norm() / steps.sum()).item(), 6),
               "pca_explained_top2": [round(e, 6) for e in explained],
               "wall_time_s": round(time.perf_counter() - start, 1)}
    for target, frame in ((paths.path_csv, path), (paths.coordinates_csv, coordinates)):
        with io.atomic_path(target) as tmp:
            frame.to_csv(tmp, index=False)
    with io.atomic_dir(paths.figures) as tmp:
        for name, figure in plots.parameter_paths(path, coordinates, explained).items():
            plots.save(figure, tmp / name)
    metrics["platform"] = machine.describe(problem.x.device)  # bit-identity holds within one platform
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({"paths/straightness": metrics["straightness"]})
    for target in (paths.metrics, paths.path_csv, paths.coordinates_csv):
        tracker.log_artifact(target)
    for png in sorted(paths.figures.glob("*.png")):
        tracker.log_artifact(png, "figures")
    return metrics
