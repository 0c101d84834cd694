"""tune@KIND: each seed of final.seeds reruns the method's tuning with that seed. Compared with
the search and drmad stages run directly at that seed (the explicit reference), seed by seed."""
import pytest
import torch

from pipeline.layout import Outputs
from pipeline import io
from pipeline.config import parse_params
from pipeline.experiments import drmad, search, tune
from helpers import Interrupt, tiny_params, tiny_settings

TINY = tiny_settings(baseline={"epochs": 2, "batch_size": 32, "last_n": 1},
                     search={"samplers": ["random"], "trial_epochs": 1, "budget": 10, "tpe_startup_trials": 2},
                     drmad={"inits": [-4.0], "meta_iterations": 3, "epochs_start": 1, "epochs_cap": 2,
                            "batch_size": 32, "reverse_steps": 3},
                     adaptive={"variants": {"a": {"every": 2, "window": 2}}, "val_batch_size": 20},
                     final={"seeds": [1, 2]})


@pytest.fixture(scope="module")
def tuned(prepared, tmp_path_factory):
    root, params = tmp_path_factory.mktemp("tuned"), parse_params(TINY)
    return {kind: tune.run(params, prepared, kind, Outputs(root).tune(kind)) for kind in ("search", "drmad")}, root


def direct(params, prepared, kind, seed, where):
    """The stage itself, run at `seed`: what that seed's tuning must reproduce."""
    p = params.model_copy(update={"seed": seed})
    if kind == "search":
        return search.run(p, prepared, "random", Outputs(where).search("random"))
    paths = Outputs(where).drmad("-4")
    drmad.run(p, prepared, -4.0, paths)
    return torch.load(paths.hypers, weights_only=True)["chosen"]


def test_each_seed_is_its_own_tuning_equal_to_the_stage_at_that_seed(prepared, tuned, tmp_path):
    params = parse_params(TINY)
    metrics, root = tuned
    searched = metrics["search"]["methods"]["random"]
    assert searched["seed1"]["log10_l2"] != searched["seed2"]["log10_l2"]  # distinct trial lists
    choices = torch.load(root / "results/tune/drmad.pt", weights_only=True)["drmad -4"]
    first, second = (torch.cat([c.flatten() for c in choices[s]["l2_coefficients"].values()]) for s in ("seed1", "seed2"))
    assert not torch.equal(first, second)  # distinct DrMAD hyperparameters
    for seed in (1, 2):
        ref = direct(params, prepared, "search", seed, tmp_path / f"search{seed}")
        got = searched[f"seed{seed}"]
        assert (got["log10_l2"], got["alpha"], got["best_trial"]) == \
            (ref["best_log10_l2"], 10.0 ** ref["best_log10_alpha"], ref["best_trial"])
        assert got["tuning_work"] == ref["work_gradient_equivalents"] == 3 * 3  # floor(10 / 3) trials of 3 steps
        ref = direct(params, prepared, "drmad", seed, tmp_path / f"drmad{seed}")
        assert choices[f"seed{seed}"]["meta_iteration"] == ref["meta_iteration"]
        for name, c in ref["l2_coefficients"].items():
            assert torch.equal(choices[f"seed{seed}"]["l2_coefficients"][name], c)
    assert not any((root / "checkpoints/tune").iterdir())  # the finished tunings are in results/tune


def test_the_searches_spend_the_search_stages_budget_at_every_seed(prepared, tmp_path):
    """budget: drmad is read once, from the drmad stages' metrics, and every seed's search gets it."""
    params = tiny_params(TINY, search={"budget": "drmad"})
    io.write_json(tmp_path / "metrics/drmad/-4.0.json", {"work_gradient_equivalents": 7.5})
    for seed in (1, 2):
        p = tune.seeded(params, "search", seed, tmp_path)
        assert (p.seed, p.search.budget, p.search.storage) == (seed, 7.5, None)
    metrics = tune.run(params, prepared, "search", Outputs(tmp_path).tune("search"), root=tmp_path)
    assert [c["trials"] for c in metrics["methods"]["random"].values()] == [2, 2]  # floor(7.5 / 3)


def test_an_interrupted_tuning_keeps_its_finished_seeds(prepared, tuned, tmp_path, monkeypatch):
    params = parse_params(TINY)
    paths = Outputs(tmp_path).tune("search")
    ran, real = [], tune.tune_one

    def stop_at_seed_2(p, *args, **kwargs):
        ran.append(p.seed)
        if p.seed == 2 and len(ran) == 2:
            raise Interrupt
        return real(p, *args, **kwargs)

    monkeypatch.setattr(tune, "tune_one", stop_at_seed_2)
    with pytest.raises(Interrupt):
        tune.run(params, prepared, "search", paths)
    assert not paths.metrics.exists()
    got = tune.run(params, prepared, "search", paths)
    assert ran == [1, 2, 2]  # seed 1 was not tuned again
    untimed = [{s: {k: v for k, v in c.items() if k != "tuning_wall_s"} for s, c in m["methods"]["random"].items()}
               for m in (got, tuned[0]["search"])]
    assert untimed[0] == untimed[1]
