"""The `quality` stage: how good are DrMAD hypergradients? (thesis 3.1, algorithms §8)

The MNIST MLP in the form w = e^s * z trains z on CE(e^s * z) + c ||z||^2 from a fixed seeded
z_0; the per-unit log scales s are the hyperparameters. Each meta-iteration trains with one
seed (batches, z_0) in exact arithmetic and in floats, and takes the hypergradients of the
validation loss: exact, float reversal (walked back side by side with exact: figs 3.4-3.6), DrMAD with
the heuristic S and with a fixed S, DrMAD2, and the peers of algorithms §6b: truncated reversal
(each K of `truncate`), implicit differentiation (each `neumann_terms`) and the greedy one-step
hypergradient. Then s follows the sign of the heuristic DrMAD's hypergradient, as the thesis
did. A checkpoint after each meta-iteration lets an interrupted run resume; leaving the
fixed-point range or a non-finite value ends the run as the outcome `diverged`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd
import torch

from pipeline import io, machine, plots
from pipeline.layout import QualityOutputs
from pipeline.experiments.summaries import hyper_quantiles
from pipeline.tracking import SILENT, Tracker
from pipeline.checkpoint import Checkpoint, fingerprint
from pipeline.config import Params, QualityConfig, QualityProtocol
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import ExactPath, FixedPointOverflow, FloatPath, Problem, TruncatedPath, greedy, ift
from pipeline.hypergrad.drmad import LinePath, drmad2_path, heuristic_steps, step_map
from pipeline.hypergrad.hvp import HVP, HVP_METHODS
from pipeline.hypergrad.problem import flat
from pipeline.hypergrad import exact_process
from pipeline.hypergrad.exact_process import ExactProcess
from pipeline.hypergrad.reverse import Walk, compare_walks, cosine, reverse
from pipeline.meta import MetaState, layer_summary, run_meta_iterations, sign_step
from pipeline.training import setup_device
from pipeline.op_floor import op_floor
from pipeline.quality_mlp import build_problem, error_rate, load_data, penalty
from pipeline.work import step_costs

BASE_METHODS = ("exact", "float", "drmad", "drmad_fixed", "drmad2")
WEIGHTINGS = ("text", "scripts")  # the heuristic's readings of gamma: S is reported for both
FOLLOWED = "drmad"  # the hypergradient whose sign the meta-iterations follow
TRACE = ("theta_norm", "dw_norm", "w", "v", "d_theta", "dw", "cos_d_theta")


class Diverged(ArithmeticError):
    """A meta-iteration's float run left the float range: no float method has a value."""


@dataclass(frozen=True)
class Setup:
    """What every meta-iteration of one quality variant shares: the MLP problem (its scales are
    the hyperparameters), the fixed penalty, the settings, the HVP, the data splits (for errors),
    and the process that takes the exact half (`exact_process`), if any."""
    problem: Problem
    l2: HyperSpace
    cfg: QualityConfig
    protocol: QualityProtocol
    hvp: HVP
    splits: dict | None = None
    exact_worker: ExactProcess | None = None


def hypergradients(setup: Setup) -> dict:
    """The five hypergradients of s (flat, by method) of one seeded training, the reverse-pass
    trace of exact vs float reversal, w_T and the reverse steps DrMAD took. With
    `exact_worker`, the exact half (training in fixed point, reversal) runs there meanwhile.

    Exact reversal undoes the fixed-point run; the float methods use the float run of the same
    seed (the two differ by rounding only). Float reversal must undo its own run: undoing the
    fixed-point one in floats would miss the bits the buffer restores (up to 2^-32 in v per
    step) and so overstate its error."""
    problem, l2, cfg, protocol, hvp, exact_worker = (setup.problem, setup.l2, setup.cfg, setup.protocol, setup.hvp,
                                                     setup.exact_worker)
    coef, keep = problem.l2_coefficients(l2), set(spread(problem.steps, cfg.trace_points))
    if exact_worker:
        exact_worker.start(problem.scales.values)
    floats = FloatPath.train(problem, coef)
    w_T, v_T, distances = floats.w(), floats.v(), floats.distances  # what the float methods see
    if not bool(torch.isfinite(distances).all()):
        if exact_worker:  # its verdict first: the fixed-point run overflows before floats do
            for _ in exact_worker.walk():
                pass
        raise Diverged("the float run left the float range")

    def line(steps: int) -> LinePath:
        return LinePath(problem.w0, w_T, steps, step_map(cfg.step_map, steps, problem.steps, distances))

    def heuristic(d: torch.Tensor, weighting: str = protocol.heuristic) -> int:
        return min(heuristic_steps(d, protocol.multiplier, weighting), cfg.max_reverse_steps)

    steps = heuristic(distances)
    # DrMAD2 walks a copy of the float run's end: float reversal walks `floats` back to w_0
    drmad2 = drmad2_path(problem, w_T, v_T, distances, cfg.last, heuristic, cfg.step_map)
    lines = (reverse(problem, line(steps), l2, hvp), reverse(problem, line(cfg.drmad_steps), l2, hvp),
             reverse(problem, drmad2, l2, hvp))
    others = peers(problem, l2, cfg, hvp, floats, steps)  # before float reversal walks `floats` back
    exact = exact_worker.walk() if exact_worker else Walk(problem, ExactPath.train(problem, coef), l2, hvp, keep)
    plain = Walk(problem, floats, l2, hvp, keep, stop_when_lost=True)
    trace = compare_walks(exact, plain)
    results = {**dict(zip(BASE_METHODS, (exact.result, plain.result, *lines))), **others}
    return {"grads": {m: flat(r["scale"]) for m, r in results.items()}, "named": results["drmad"]["scale"],
            "trace": trace, "w_T": exact.w_T, "reverse_steps": steps,
            "work": {m: r["work"] for m, r in results.items()},
            "heuristic_steps": {w: heuristic(distances, w) for w in WEIGHTINGS},
            "val_loss": exact.result["val_loss"]}


def peers(problem: Problem, l2: HyperSpace, cfg: QualityConfig, hvp: HVP, floats: FloatPath, drmad_steps: int) -> dict:
    """The other families on the float run at w_T (algorithms §6b): truncated reversal for each K
    (S: DrMAD's heuristic S, so its cost matches DrMAD's), implicit differentiation for each
    Neumann term count, the greedy one-step hypergradient."""
    out = {}
    for k in cfg.truncate:
        last = min(drmad_steps if k == "S" else k, problem.steps)
        path = TruncatedPath(FloatPath(problem, floats.w(), floats.v()), last)
        out[f"truncated_{k}"] = reverse(problem, path, l2, hvp)
    for terms in cfg.neumann_terms:
        out[f"ift_{terms}"] = ift.hypergradient(problem, l2, floats.w(), hvp, terms, cfg.neumann_step)
    out["greedy"] = greedy.hypergradient(problem, l2, floats.w_before, floats.w())
    return out


def methods(cfg: QualityConfig) -> list[str]:
    """The study's hypergradients, in the order its tables and figures list them."""
    return [*BASE_METHODS, *(f"truncated_{k}" for k in cfg.truncate), *(f"ift_{n}" for n in cfg.neumann_terms), "greedy"]


def counted_work(steps: int, work: dict, hvp_cost: float) -> float:
    """One hypergradient's counted work in gradient evaluations: the T training gradients, its own
    gradients, and its HVPs at the declared `hvp_cost`."""
    return steps + work["gradients"] + hvp_cost * work["hvps"]


def compare(grads: dict[str, torch.Tensor]) -> list[dict]:
    """Per method: its norm, and the cosines of it and of its sign vector with the exact one's."""
    exact = grads["exact"]
    return [{"method": m, "norm": g.norm().item(), "norm_ratio": (g.norm() / exact.norm()).item(),
             "cos_exact": cosine(g, exact), "sign_cos_exact": cosine(torch.sign(g), torch.sign(exact))}
            for m, g in grads.items()]


def spread(n: int, points: int) -> list[int]:
    """`points` evenly spread indices of range(n), first and last always kept (all when n <= points)."""
    return sorted({round(i * (n - 1) / (points - 1)) for i in range(points)}) if n > points else list(range(n))


class QualityState(MetaState):
    """One quality run's meta-iterations: the MLP's log scales, followed with DrMAD's hypergradient."""

    def __init__(self, scales: HyperSpace):
        super().__init__(scales, ("hypergrads", "errors", "reverse", "layers", "meta"))


def meta_iteration(state: QualityState, setup: Setup, tracker: Tracker) -> bool:
    """Five hypergradients, their comparison, errors, a sign step. False when it diverged."""
    problem, cfg = setup.problem, setup.cfg
    i, start = state.iteration, time.perf_counter()
    state.rows["layers"] += [{"meta_iteration": i, "layer": n, **s} for n, s in layer_summary(state.hypers).items()]
    try:
        got = hypergradients(setup)
    except (FixedPointOverflow, Diverged):
        return False
    if not all(bool(torch.isfinite(got["grads"][m]).all()) for m in ("exact", FOLLOWED)):
        return False  # the others may overflow (float reversal does, for long T): recorded as NaN
    compared = [{**row, "hvps": got["work"][row["method"]]["hvps"],
                 "work": counted_work(problem.steps, got["work"][row["method"]], cfg.hvp_cost)}
                for row in compare(got["grads"])]
    errors = {s: error_rate(problem, got["w_T"], *(setup.splits[s][k].to(problem.x.device) for k in ("x", "y")))
              for s in ("train", "val", "test")}
    sign_step(state.hypers, got["named"], state.momentum, cfg.hyper_step, cfg.hyper_momentum)

    state.rows["hypergrads"] += [{"meta_iteration": i, **row} for row in compared]
    state.rows["errors"] += [{"meta_iteration": i, "split": s, "error": e} for s, e in errors.items()]
    trace = got["trace"]
    state.rows["reverse"] += [{"meta_iteration": i, "steps_back": problem.steps - s, "quantity": q, "value": trace[q][j]}
                              for j, s in enumerate(trace["step"]) for q in TRACE]  # the traced rows only
    state.rows["meta"].append({"meta_iteration": i, "reverse_steps": got["reverse_steps"], "val_loss": got["val_loss"],
                               **{f"reverse_steps_{w}": n for w, n in got["heuristic_steps"].items()},
                               "seconds": time.perf_counter() - start, **{f"{s}_error": e for s, e in errors.items()}})
    metrics = {f"meta/error/{s}": e for s, e in errors.items()}
    for row in compared:
        metrics.update({f"hypergrad/norm/{row['method']}": row["norm"],
                        f"hypergrad/cos_exact/{row['method']}": row["cos_exact"],
                        f"hypergrad/sign_cos_exact/{row['method']}": row["sign_cos_exact"]})
    metrics.update(hyper_quantiles(state.hypers, "log_scale"))  # per layer: layers.csv
    tracker.log_metrics({**metrics, "meta/drmad_reverse_steps": got["reverse_steps"]}, step=i)
    return True


def run(params: Params, name: str, paths: QualityOutputs, tracker: Tracker = SILENT,
        progress: bool | None = None, exact_worker: ExactProcess | None | str = "auto") -> dict:
    """`quality.meta_iterations` meta-iterations of run `name` (a protocol at a forward length);
    writes every output. `exact_worker`: the process for the exact half (`exact_process`): "auto"
    starts one when wanted; the stage starts it before its imports and passes it (or None)."""
    if exact_worker == "auto":
        with exact_process.for_params(params.device, params.threads, params.hvp) as started:
            return run(params, name, paths, tracker, progress, started)
    cfg = params.quality
    device = setup_device(params.device, params.threads)
    protocol, steps = cfg.protocol(name), cfg.variants[name].steps
    splits, info = load_data(cfg, protocol)
    problem = build_problem(cfg, protocol, params.seed, steps, splits, info, device)
    l2 = penalty(problem, protocol, device)
    if exact_worker:
        exact_worker.load(problem, l2, set(spread(steps, cfg.trace_points)))
    state = QualityState(problem.scales)
    shared = cfg.model_dump(exclude={"protocols", "variants"})
    checkpoint = Checkpoint(paths.checkpoint, fingerprint(name, cfg.variants[name].model_dump(), params.seed, params.hvp, shared,
                                                          protocol.model_dump(), info["digest"], QualityState.FORMAT))
    if (saved := checkpoint.load(device)) is not None:
        state.restore(saved)
    hvp = HVP_METHODS[params.hvp]
    costs = [step_costs(problem, hvp)]  # the op floor's, timed before and after the run
    started, first, cpu_started = time.perf_counter(), state.iteration, time.process_time()

    def followed() -> dict:
        drmad = [r for r in state.rows["hypergrads"] if r["method"] == FOLLOWED][-1]
        return {"cos_drmad_exact": f"{drmad['cos_exact']:.3f}", "norm_ratio": f"{drmad['norm_ratio']:.3g}"}
    setup = Setup(problem, l2, cfg, protocol, hvp, splits, exact_worker)
    run_meta_iterations(state, cfg.meta_iterations_of(name), lambda: meta_iteration(state, setup, tracker),
                        checkpoint.save, f"quality {name}", followed, progress, tracker)
    sizes = info["sizes"]
    metrics = {"variant": name, "protocol": cfg.variants[name].protocol, "meta_iterations": cfg.meta_iterations_of(name),
               "hvp_cost": cfg.hvp_cost,
               "data": f"{info['source']} {sizes['train']}/{sizes['val']}/{sizes['test']}",
               **summarise(state, steps, time.perf_counter() - started), "processes": 2 if exact_worker else 1,
               "cpu_time_s": round(time.process_time() - cpu_started + (exact_worker.cpu_s if exact_worker else 0.0), 1)}
    if exact_worker:
        exact_worker.close()  # before the floor is timed again: on an otherwise idle core
    costs.append(step_costs(problem, hvp))
    metrics.update(op_floor(problem.steps, costs, [r for r in state.rows["hypergrads"] if r["meta_iteration"] >= first],
                            metrics["wall_time_s"], metrics["cpu_time_s"]))
    metrics["platform"] = machine.describe(problem.x.device)  # bit-identity holds within one platform
    write_outputs(paths, state, metrics, f"{cfg.variants[name].protocol} protocol, T = {steps:,}", tracker)
    checkpoint.clear()
    return metrics


def summarise(state: QualityState, steps: int, seconds: float) -> dict:
    """Per compared method, lists over meta-iterations of the norm ratio and cosines to exact."""
    table = pd.DataFrame(state.rows["hypergrads"])
    out = {"forward_steps": steps, "outcome": state.outcome, "meta_iterations_completed": state.iteration,
           "wall_time_s": round(seconds, 1),
           "methods": list(dict.fromkeys(table["method"])) if len(table) else [],
           "reverse_steps": [r["reverse_steps"] for r in state.rows["meta"]],
           **{f"reverse_steps_{w}": [r[f"reverse_steps_{w}"] for r in state.rows["meta"]] for w in WEIGHTINGS}}
    exact = table[table["method"] == "exact"] if len(table) else table
    out["exact/norm"] = [number(v) for v in exact["norm"]] if len(exact) else []
    for key in ("hvps", "work"):
        out[f"exact/{key}"] = [number(v) for v in exact[key]] if len(exact) else []
    for method in out["methods"][1:]:
        rows = table[table["method"] == method]
        for key in ("norm_ratio", "cos_exact", "sign_cos_exact", "hvps", "work"):
            out[f"{method}/{key}"] = [number(v) for v in rows[key]] if len(rows) else []
    errors = state.rows["meta"][-1] if state.rows["meta"] else {}
    out.update({f"final_{s}_error": errors.get(f"{s}_error") for s in ("train", "val", "test")})
    return out


def number(value: float) -> float | None:
    """6 significant digits for JSON; None for NaN/inf (not JSON, and not a measurement)."""
    return float(f"{value:.6g}") if math.isfinite(value) else None


def write_outputs(paths: QualityOutputs, state: QualityState, metrics: dict, title: str, tracker: Tracker) -> None:
    frames = {name: pd.DataFrame(state.rows[name]) for name in ("hypergrads", "errors", "reverse")}
    for path, name in ((paths.hypergrads_csv, "hypergrads"), (paths.errors_csv, "errors"),
                       (paths.reverse_csv, "reverse")):
        with io.atomic_path(path) as tmp:
            frames[name].to_csv(tmp, index=False)
    figures = plots.quality_figures(frames, title) if state.rows["meta"] else {}
    with io.atomic_dir(paths.figures) as tmp:
        for name, figure in figures.items():
            plots.save(figure, tmp / name)
    io.write_metrics(paths.metrics, metrics)
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v is not None})
    for path in (paths.metrics, paths.hypergrads_csv, paths.errors_csv, paths.reverse_csv):
        tracker.log_artifact(path)
    for png in sorted(paths.figures.glob("*.png")):
        tracker.log_artifact(png, "figures")
