"""The MLP arena of the verdict (`arena: mlp`): the thesis' CPU experiment as a benchmark.

One stage instance per seed. Every method tunes the quality study's MLP (protocol
`arena.protocol`, the quality data) at one counted budget, then its choice trains again from a
fresh initialisation and batch order (the seed's final stream, the same for every method) and is
tested: the unit of replication is tune + retrain (Bouthillier et al., "Accounting for variance in
machine learning benchmarks", 2021), and each seed's tuning draws its own streams.

- drmad, drmad2, exact, truncated (K = `quality.truncate`'s first number), greedy: meta-iterations
  from the hand-set scales, each a training of T steps, that method's hypergradient of the per-unit
  log scales s, and a sign step of `quality.hyper_step` (the
  thesis' CPU protocol); one more runs while the last one's counted work still fits the budget.
  Choice: the scales of the meta-iteration with the lowest validation error (every training is
  T steps long, so the choice compares equal lengths).
- random, tpe, hyperband (Optuna): the global log scale s (every vector's) and the log L2
  coefficient, trials of T steps while one more fits; hyperband (`HyperbandPruner`, random
  configurations) reports validation error every T / rungs steps and its budget counts the steps
  its trials ran.
- baseline: the hand-set protocol, no tuning.

Counted work (pipeline/work.py's unit): a training step 1 gradient; a hypergradient its HVPs at
`quality.hvp_cost` and its gradients (the validation gradient, and any training gradient an HVP
did not return). Evaluations tune nothing and are not counted.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch.func import functional_call

from pipeline import io
from pipeline.layout import Outputs
from pipeline.config import Params, QualityProtocol
from pipeline import quality_mlp
from pipeline.experiments import quality
from pipeline.hypergrad import FloatPath, Problem, hypergradient
from pipeline.meta import sign_step, zero_momentum
from pipeline.seeds import derive_seed
from pipeline.tracking import SILENT, Tracker
from pipeline.training import setup_device

TUNE_STREAM, FINAL_STREAM, SAMPLER_STREAM = 11, 12, 13
GRADIENT_METHODS = ("drmad", "drmad2", "exact", "truncated", "greedy")
SEARCH_METHODS = ("random", "tpe", "hyperband")
METHODS = ("baseline", *GRADIENT_METHODS, *SEARCH_METHODS)


@dataclass
class Setting:
    """What one arena seed shares between its methods: data, protocol, device."""
    params: Params
    protocol: QualityProtocol
    splits: dict
    info: dict
    device: torch.device

    @property
    def steps(self) -> int:
        return self.params.arena.steps

    def problem(self, seed: int, protocol: QualityProtocol | None = None) -> Problem:
        return quality_mlp.build_problem(self.params.quality, protocol or self.protocol, seed, self.steps, self.splits,
                                     self.info, self.device)

    def penalty(self, problem: Problem, protocol: QualityProtocol | None = None):
        return quality_mlp.penalty(problem, protocol or self.protocol, self.device)

    def wrong(self, problem: Problem, w: torch.Tensor, split: str) -> list[int]:
        """Indices of the split's images the weights classify wrongly."""
        x, y = (self.splits[split][k].to(self.device) for k in ("x", "y"))
        with torch.no_grad():
            logits = functional_call(problem.model, problem.named(w), (x.flatten(1).to(problem.dtype),))
        return torch.nonzero(logits.argmax(1) != y).flatten().tolist()

    def error(self, problem: Problem, w: torch.Tensor, split: str = "val") -> float:
        if not bool(torch.isfinite(w).all()):
            return math.nan
        return len(self.wrong(problem, w, split)) / len(self.splits[split]["y"])


def searched(protocol: QualityProtocol, values: dict[str, float]) -> QualityProtocol:
    """The protocol with a search's global log scale and log L2 coefficient (in the protocol's base)."""
    return protocol.model_copy(update={"init_scale": values["log_scale"], "log_l2": values["log_l2"]})


# -- gradient-based tuning ------------------------------------------------------------------------

def tune_by_hypergradient(setting: Setting, method: str, seed: int, budget: float) -> dict:
    """Meta-iterations while the budget allows; the scales of the best validation error."""
    cfg, protocol = setting.params.quality, setting.protocol
    problem = setting.problem(derive_seed(seed, TUNE_STREAM))
    l2, momentum = setting.penalty(problem), zero_momentum(problem.scales)
    truncate = next((k for k in cfg.truncate if k != "S"), 100)
    options = {"multiplier": protocol.multiplier, "last": cfg.last, "step_map": cfg.step_map, "hvp": setting.params.hvp,
               "truncate": truncate}
    history, used, best, last_cost = [], 0.0, None, 0.0
    while used + last_cost <= budget:
        try:
            got = hypergradient(problem, l2, method, **options)
        except ArithmeticError:  # the fixed-point range left, or DrMAD's heuristic on a diverged run
            history.append({"step": len(history), "val_error": math.nan, "work": used})
            break
        last_cost = quality.counted_work(problem.steps, got["work"], cfg.hvp_cost)
        used += last_cost
        val = setting.error(problem, got["w_T"])
        history.append({"step": len(history), "val_error": val, "work": used})
        if not math.isfinite(val) or not all(bool(torch.isfinite(g).all()) for g in got["scale"].values()):
            break
        if best is None or val < best[0]:
            best = (val, {k: v.clone() for k, v in problem.scales.values.items()})
        sign_step(problem.scales, got["scale"], momentum, cfg.hyper_step, cfg.hyper_momentum)
    return {"history": history, "work": used, "scales": best[1] if best else None,
            "choice": {"meta_iteration": min(range(len(history)), key=lambda i: _order(history[i]["val_error"]))}
            if best else {}}


def _order(value: float) -> float:
    return value if math.isfinite(value) else math.inf


# -- searches --------------------------------------------------------------------------------------

def study(setting: Setting, method: str, seed: int) -> optuna.Study:
    sampler_seed = derive_seed(seed, SAMPLER_STREAM, SEARCH_METHODS.index(method)) % 2 ** 32  # Optuna: 32 bits
    cfg = setting.params.arena
    if method == "tpe":
        sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=cfg.tpe_startup_trials)
    else:
        sampler = optuna.samplers.RandomSampler(seed=sampler_seed)
    pruner = (optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.rungs, reduction_factor=3)
              if method == "hyperband" else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=f"arena-{method}-{seed}", sampler=sampler, pruner=pruner)


def tune_by_search(setting: Setting, method: str, seed: int, budget: float) -> dict:
    """Trials while one more fits the budget (hyperband: while one more rung fits)."""
    cfg, steps = setting.params.arena, setting.steps
    rung = steps // cfg.rungs if method == "hyperband" else steps
    runs, history, used = study(setting, method, seed), [], [0]
    space = {"log_scale": optuna.distributions.FloatDistribution(*cfg.log_scale),
             "log_l2": optuna.distributions.FloatDistribution(*cfg.log_l2)}
    tune_seed = derive_seed(seed, TUNE_STREAM)
    while used[0] + rung <= budget:
        trial = runs.ask(space)
        protocol = searched(setting.protocol, trial.params)
        problem = setting.problem(tune_seed, protocol)
        path = FloatPath(problem, problem.w0, torch.zeros_like(problem.w0))
        coef, val, state = problem.l2_coefficients(setting.penalty(problem, protocol)), math.nan, optuna.trial.TrialState.COMPLETE
        for t in range(steps):
            path.step(t, coef)
            used[0] += 1
            if (t + 1) % rung == 0 or t + 1 == steps:
                val = setting.error(problem, path.w())
                trial.report(1.0 if math.isnan(val) else val, (t + 1) // rung)
                if t + 1 < steps and (trial.should_prune() or used[0] + rung > budget or math.isnan(val)):
                    state = optuna.trial.TrialState.PRUNED
                    break
        pruned = state == optuna.trial.TrialState.PRUNED
        runs.tell(trial, None if pruned else (1.0 if math.isnan(val) else val), state=state)
        history.append({"step": trial.number, "val_error": val, "work": used[0], "pruned": pruned, **trial.params})
    complete = [h for h in history if not h["pruned"] and math.isfinite(h["val_error"])]
    best = min(complete, key=lambda h: h["val_error"]) if complete else None
    return {"history": history, "work": float(used[0]),
            "values": {k: best[k] for k in space} if best else None, "choice": {"trial": best["step"]} if best else {}}


# -- one seed --------------------------------------------------------------------------------------

def retrain(setting: Setting, seed: int, tuned: dict | None) -> dict:
    """The choice trained from the seed's final initialisation and batch order, then tested."""
    final_seed = derive_seed(seed, FINAL_STREAM)
    protocol = searched(setting.protocol, tuned["values"]) if tuned and tuned.get("values") else setting.protocol
    problem = setting.problem(final_seed, protocol)
    if tuned and tuned.get("scales") is not None:
        for key, value in tuned["scales"].items():
            problem.scales.values[key].copy_(value)
    w = FloatPath.train(problem, problem.l2_coefficients(setting.penalty(problem, protocol))).w()
    if not bool(torch.isfinite(w).all()):
        return {"outcome": "diverged", "test_error": None, "test_wrong": [], "val_error": None}
    wrong = setting.wrong(problem, w, "test")
    return {"outcome": "finished", "test_error": len(wrong) / len(setting.splits["test"]["y"]), "test_wrong": wrong,
            "val_error": setting.error(problem, w)}


def run_seed(setting: Setting, seed: int, budget: float, progress=None) -> dict:
    """Every method's tuning and retraining at one seed: {method: entry}."""
    out = {}
    for method in METHODS:
        start = time.perf_counter()
        if method == "baseline":
            tuned = {"history": [], "work": 0.0, "choice": {}}
        elif method in GRADIENT_METHODS:
            tuned = tune_by_hypergradient(setting, method, seed, budget)
        else:
            tuned = tune_by_search(setting, method, seed, budget)
        tuned_s = time.perf_counter() - start
        final = retrain(setting, seed, tuned if method != "baseline" else None)
        out[method] = {**final, "tuning_work": tuned["work"], "final_work": float(setting.steps),
                       "tuning_wall_s": round(tuned_s, 2), "final_wall_s": round(time.perf_counter() - start - tuned_s, 2),
                       "evaluations": len(tuned["history"]), "choice": tuned["choice"],
                       "values": tuned.get("values"),
                       "scales": {k: v.tolist() for k, v in tuned["scales"].items()} if tuned.get("scales") else None,
                       "history": tuned["history"]}
        if progress:
            progress(method, out[method])
    return out


def run(params: Params, seed: int, root: Path = Path("."), tracker: Tracker = SILENT) -> dict:
    """Arena seed `seed`: every method tuned and retrained; writes results/arena/SEED.json."""
    cfg = params.arena
    device = setup_device(params.device, params.threads)
    protocol = params.quality.protocols[cfg.protocol]
    splits, info = quality_mlp.load_data(params.quality, protocol)
    setting = Setting(params, protocol, splits, info, device)

    def progress(method: str, entry: dict) -> None:
        error = "diverged" if entry["test_error"] is None else f"{entry['test_error']:.4f}"
        print(f"arena seed {seed} {method}: {entry['evaluations']} evaluations, work {entry['tuning_work']:.0f}, "
              f"test error {error}", flush=True)
        tracker.log_metrics({f"{method}/test_error": entry["test_error"] if entry["test_error"] is not None
                             else math.nan, f"{method}/tuning_work": entry["tuning_work"]})

    methods = run_seed(setting, seed, cfg.budget, progress)
    sizes = info["sizes"]
    out = {"seed": seed, "protocol": cfg.protocol, "steps": cfg.steps, "budget": cfg.budget,
           "hvp_cost": params.quality.hvp_cost, "test_size": len(splits["test"]["y"]),
           "data": f"{info['source']} {sizes['train']}/{sizes['val']}/{sizes['test']}", "methods": methods}
    io.write_metrics(Outputs(root).arena(seed), out)
    tracker.log_artifact(Outputs(root).arena(seed))
    return out
