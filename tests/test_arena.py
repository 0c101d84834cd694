"""The MLP arena: every method tunes at one counted budget with its seed's own streams, then its
choice is retrained from the seed's final initialisation and tested."""
import math

import pytest
import torch

from pipeline.config import parse_params
from pipeline.experiments import arena, quality
from pipeline.hypergrad import FloatPath
from pipeline.seeds import derive_seed

PROTOCOL = {"hidden": [10, 10], "activation": "tanh", "biases": "scaled", "pixels": "centred", "batch_size": 20,
            "alpha": 0.05, "momentum": 0.9, "log_l2": -4.0, "l2_base": "e", "init_scale": 0.2, "z0_log_scale": -3.0,
            "multiplier": 1.0}
STEPS, BUDGET, HVP_COST = 20, 200.0, 2.0
TINY = {"device": "cpu",
        "quality": {"data": {"source": "mnist5k", "train_size": 200, "val_size": 100, "test_size": 100},
                    "protocols": {"p": PROTOCOL}, "variants": {"t": {"protocol": "p", "steps": STEPS}},
                    "last": 5, "hvp_cost": HVP_COST, "hyper_step": 0.3},
        "trajectory": {"protocol": "p"},
        "arena": {"protocol": "p", "seeds": [0, 1], "steps": STEPS, "budget": BUDGET, "rungs": 4,
                  "tpe_startup_trials": 2}}


@pytest.fixture(scope="module")
def setting():
    params = parse_params(TINY)
    protocol = params.quality.protocols["p"]
    splits, info = quality.load_data(params.quality, protocol)
    return arena.Setting(params, protocol, splits, info, torch.device("cpu"))


@pytest.fixture(scope="module")
def seeds(setting):
    return {seed: arena.run_seed(setting, seed, BUDGET) for seed in (0, 1)}


def test_every_method_tunes_within_one_counted_budget(seeds):
    for results in seeds.values():
        assert set(results) == set(arena.METHODS)
        for method, entry in results.items():
            assert entry["tuning_work"] <= BUDGET, method
            assert entry["outcome"] == "finished" and len(entry["test_wrong"]) == round(100 * entry["test_error"])
        assert results["baseline"]["tuning_work"] == 0 and results["baseline"]["evaluations"] == 0
        # random and TPE: trials of T steps while one more fits, floor(200 / 20) = 10
        assert results["random"]["evaluations"] == results["tpe"]["evaluations"] == BUDGET // STEPS
        assert results["random"]["tuning_work"] == BUDGET
        assert results["hyperband"]["evaluations"] >= results["random"]["evaluations"]  # pruned trials cost less


def test_counted_work_of_the_gradient_methods_by_hand(seeds):
    """Each meta-iteration: T training gradients, one validation gradient, its HVPs at hvp_cost
    (exact: T; DrMAD: its S; DrMAD2: K + its line); one more runs while the last one's work fits."""
    for results in seeds.values():
        exact = results["exact"]["history"]
        per = STEPS + 1 + HVP_COST * STEPS
        assert [h["work"] for h in exact] == pytest.approx([per * (i + 1) for i in range(len(exact))])
        assert len(exact) == int(BUDGET // per)
        for method in ("drmad", "drmad2", "truncated", "greedy"):
            steps = [b["work"] - a["work"] for a, b in zip([{"work": 0.0}] + results[method]["history"],
                                                            results[method]["history"])]
            hvps = [(w - STEPS - 1) / HVP_COST for w in steps]
            assert all(h == pytest.approx(round(h)) and h >= 1 for h in hvps), (method, hvps)
            assert results[method]["tuning_work"] + steps[-1] > BUDGET  # it stopped because one more would not fit


def test_each_seed_tunes_with_its_own_streams(seeds):
    zero, one = seeds[0], seeds[1]
    for method in ("random", "tpe", "hyperband"):
        first = [(h["log_scale"], h["log_l2"]) for h in zero[method]["history"]]
        assert first != [(h["log_scale"], h["log_l2"]) for h in one[method]["history"]], method
        assert len(set(first)) == len(first)
    for method in arena.GRADIENT_METHODS:
        assert zero[method]["scales"] != one[method]["scales"], method  # distinct tuned hyperparameters per seed
    assert zero["random"]["history"] != zero["tpe"]["history"]  # samplers draw from their own streams


def test_the_baseline_is_the_hand_set_protocol_retrained_at_the_final_seed(setting, seeds):
    for seed, results in seeds.items():
        problem = setting.problem(derive_seed(seed, arena.FINAL_STREAM))
        w = FloatPath.train(problem, problem.l2_coefficients(setting.penalty(problem))).w()
        assert results["baseline"]["test_wrong"] == setting.wrong(problem, w, "test")
    assert seeds[0]["baseline"]["test_wrong"] != seeds[1]["baseline"]["test_wrong"]


def test_a_choice_is_the_best_validation_error_and_is_what_retrains(setting, seeds):
    results = seeds[0]
    history = results["random"]["history"]
    best = min((h for h in history if not h["pruned"]), key=lambda h: h["val_error"])
    assert results["random"]["choice"] == {"trial": best["step"]}
    assert results["random"]["values"] == {"log_scale": best["log_scale"], "log_l2": best["log_l2"]}
    drmad = results["drmad"]["history"]
    chosen = min(range(len(drmad)), key=lambda i: drmad[i]["val_error"])
    assert results["drmad"]["choice"] == {"meta_iteration": chosen}
    retrained = arena.retrain(setting, 0, {"values": results["random"]["values"]})
    assert retrained["test_wrong"] == results["random"]["test_wrong"]


def test_a_diverging_method_is_an_outcome_not_a_crash(setting):
    """Step sizes that overflow: every trial and meta-iteration records NaN, nothing is chosen,
    and the retrained hand-set protocol is the outcome `diverged`."""
    params = parse_params({**TINY, "quality": {**TINY["quality"], "protocols": {"p": {**PROTOCOL, "alpha": 1e200}}}})
    wild = arena.Setting(params, params.quality.protocols["p"], setting.splits, setting.info, torch.device("cpu"))
    search = arena.tune_by_search(wild, "random", 0, 60.0)
    assert len(search["history"]) == 3 and all(math.isnan(h["val_error"]) for h in search["history"])
    assert search["values"] is None
    for method in ("drmad", "exact", "greedy"):
        tuned = arena.tune_by_hypergradient(wild, method, 0, 100.0)
        assert tuned["scales"] is None and math.isnan(tuned["history"][-1]["val_error"]), method
    assert arena.retrain(wild, 0, search)["outcome"] == "diverged"
