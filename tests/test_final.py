"""Finalists: each method's choice retrained per seed at the baseline's schedule; resume keeps
finished seeds; the hyperparameters read are the ones each method chose."""

import pytest
import torch

from pipeline.layout import Outputs
from pipeline import data, inputs, io
from pipeline.config import ConfigError, parse_params
from pipeline.experiments import final
from pipeline.experiments.baseline import train
from pipeline.models import build_densenet
from pipeline.training import is_regularised
from helpers import Interrupt, tiny_params, tiny_settings

TINY = tiny_settings(baseline={"epochs": 2, "batch_size": 32, "last_n": 1},
                     drmad={"inits": [-4.0]}, search={"samplers": ["random"]},
                     adaptive={"variants": {"a": {"every": 2, "window": 2}}, "val_batch_size": 20},
                     final={"seeds": [1, 2]})


def chosen_results(root, info, l2=-1.0, search_l2=-3.0):
    """What tune@search and tune@drmad would have left: per seed, a best trial and a chosen
    meta-iteration (seed 2's differ from seed 1's)."""
    model = build_densenet(parse_params(TINY).model, info, 0)
    search, drmad = {}, {}
    for seed in (1, 2):
        search[f"seed{seed}"] = {"outcome": "finished", "log10_l2": search_l2 - (seed - 1), "alpha": 0.5,
                                 "l2_coefficients": None, "tuning_work": 12.0 * seed}
        coefs = {n: torch.full_like(p, 2 * 10.0 ** (l2 - (seed - 1)), dtype=torch.float64)
                 for n, p in model.named_parameters() if is_regularised(n)}
        drmad[f"seed{seed}"] = {"outcome": "finished", "l2_coefficients": coefs, "tuning_work": 20.0 * seed}
    io.save_torch(root / "results/tune/search.pt", {"random": search})
    io.save_torch(root / "results/tune/drmad.pt", {"drmad -4": drmad})


def test_every_kind_retrains_its_methods_once_per_seed(prepared, tmp_path):
    params = parse_params(TINY)
    info = data.load_info(prepared)
    chosen_results(tmp_path, info)
    seen = {}
    for kind in final.KINDS:
        metrics = final.run(params, prepared, kind, Outputs(tmp_path).final(kind), root=tmp_path)
        assert inputs.read_metrics(Outputs(tmp_path).final(kind).metrics) == metrics
        assert metrics["seeds"] == [1, 2] and metrics["test_size"] == 60
        seen.update(metrics["methods"])
        assert not Outputs(tmp_path).final(kind).work_dir.exists()
    assert set(seen) == {"baseline", "random", "drmad -4", "adaptive a", "adaptive a baseline-schedule"}
    for method, entry in seen.items():
        assert list(entry["test_error"]) == ["seed1", "seed2"]
        assert all(0 <= e <= 1 for e in entry["test_error"].values())
        for seed, wrong in entry["test_wrong"].items():  # which test images, as many as the error says
            assert len(wrong) == round(60 * entry["test_error"][seed]) and set(wrong) <= set(range(60))
        assert all(w == 2 * 3 for w in entry["training_work"].values())  # 2 epochs of 3 steps
    # by hand: 2 epochs of 3 steps, a hypergradient after steps 1, 3 and 5, each 2 reverse steps (an
    # HVP each) and a validation gradient; the training's 6 gradients are not tuning
    by_hand = 3 * (1 + 2 * params.work.hvp_cost)
    for method in ("adaptive a", "adaptive a baseline-schedule"):
        assert all(w == pytest.approx(by_hand, rel=1e-12) for w in seen[method]["tuning_work"].values())
    assert seen["adaptive a"]["test_wrong"] != seen["adaptive a baseline-schedule"]["test_wrong"]  # two different runs
    assert all(w == 0 for w in seen["baseline"]["tuning_work"].values())
    # each seed's own tuning is charged to that seed's retraining
    assert seen["random"]["tuning_work"] == {"seed1": 12.0, "seed2": 24.0}
    assert seen["drmad -4"]["tuning_work"] == {"seed1": 20.0, "seed2": 40.0}


def test_adaptive_finalists_run_as_the_thesis_did_and_with_the_baseline_schedule():
    """`adaptive NAME` has no schedule under its learned rates (the thesis'); `adaptive NAME baseline-schedule`
    runs the baseline's: both at the baseline's epochs, step size and seed."""
    params = tiny_params(TINY, baseline={"schedule": {"milestones": [0.5], "factor": 0.1}})
    plain, scheduled = final.finalists(params, "adaptive")
    assert (plain.method, scheduled.method) == ("adaptive a", "adaptive a baseline-schedule")
    thesis, variant = (final.adaptive_params(params, 7, f.scheduled) for f in (plain, scheduled))
    assert thesis.adaptive.schedule.milestones == [] and variant.adaptive.schedule.milestones == [0.5]
    assert thesis.seed == variant.seed == 7 and thesis.adaptive.epochs == variant.adaptive.epochs == 2


def test_finalists_train_with_the_chosen_hyperparameters(prepared, tmp_path):
    """The drmad finalist equals a direct training with its coefficients, and differs from the
    baseline's; the search finalist equals a training at its best trial's L2 and step size."""
    params = parse_params(TINY)
    info, splits = data.load_prepared(prepared, torch.device("cpu"))
    chosen_results(tmp_path, info, l2=-1.0)
    by_kind = {k: final.finalists(params, k, tmp_path)[0] for k in ("baseline", "search", "drmad")}
    assert by_kind["search"].cfg.alpha == 0.5 and by_kind["search"].cfg.log10_l2 == -3.0
    # tuned kinds: one finalist per seed, each the choice of its own seed's tuning
    searched = final.finalists(params, "search", tmp_path)
    assert [(f.seed, f.cfg.log10_l2) for f in searched] == [(1, -3.0), (2, -4.0)]
    weights = {}
    for kind, finalist in by_kind.items():
        trainer, _ = train(params, finalist.cfg, 1, splits, info, l2_coefficients=finalist.l2_coefficients)
        weights[kind] = torch.cat([p.detach().flatten() for p in trainer.params])
    direct_cfg = params.baseline.model_copy(update={"log10_l2": -1.0})
    trainer, _ = train(params, direct_cfg, 1, splits, info)
    assert torch.equal(weights["drmad"], torch.cat([p.detach().flatten() for p in trainer.params]))
    assert not torch.equal(weights["drmad"], weights["baseline"])
    assert not torch.equal(weights["search"], weights["baseline"])


def test_seeds_change_init_batches_and_masks(prepared):
    params = parse_params(TINY)
    info, splits = data.load_prepared(prepared, torch.device("cpu"))
    runs = [train(params, params.baseline, seed, splits, info)[0] for seed in (1, 1, 2)]
    flat = [torch.cat([p.detach().flatten() for p in t.params]) for t in runs]
    assert torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2])
    assert not torch.equal(runs[0].batches.indices(0), runs[2].batches.indices(0))


def test_an_interrupted_final_keeps_its_finished_seeds(prepared, tmp_path, monkeypatch):
    params = parse_params(TINY)
    paths = Outputs(tmp_path).final("baseline")
    expected = final.run(params, prepared, "baseline", Outputs(tmp_path / "straight").final("baseline"))
    trained, real_train = [], final.baseline.train

    def train_until_seed_2(params, cfg, seed, *args, **kwargs):
        trained.append(seed)
        if seed == 2 and len(trained) == 2:
            raise Interrupt
        return real_train(params, cfg, seed, *args, **kwargs)

    monkeypatch.setattr(final.baseline, "train", train_until_seed_2)
    with pytest.raises(Interrupt):
        final.run(params, prepared, "baseline", paths)
    assert (paths.work_dir / "baseline-seed1.json").is_file() and not paths.metrics.exists()
    got = final.run(params, prepared, "baseline", paths)
    assert trained == [1, 2, 2]  # seed 1 was not retrained
    assert {k: v for k, v in got["methods"]["baseline"].items() if k != "wall_time_s"} == \
        {k: v for k, v in expected["methods"]["baseline"].items() if k != "wall_time_s"}


def test_missing_choices_are_a_clear_error(prepared, tmp_path):
    params = parse_params(TINY)
    with pytest.raises(ConfigError, match="results/tune/search.pt: missing; it is written by tune@search"):
        final.finalists(params, "search", tmp_path)
    with pytest.raises(ConfigError, match="results/tune/drmad.pt: missing; it is written by tune@drmad"):
        final.finalists(params, "drmad", tmp_path)
    chosen_results(tmp_path, data.load_info(prepared))
    tuned = torch.load(tmp_path / "results/tune/search.pt", weights_only=True)
    del tuned["random"]["seed2"]  # tuned before seed 2 was added
    io.save_torch(tmp_path / "results/tune/search.pt", tuned)
    with pytest.raises(ConfigError, match="lacks random at seed 2; it is written by tune@search"):
        final.finalists(params, "search", tmp_path)


def test_a_finished_seed_is_reused_only_with_unchanged_choices(prepared, tmp_path, monkeypatch):
    """Interrupted after seed 1, the tuned choices change before the resume: seed 1 is retrained
    at its new choice, not taken from its record."""
    params = parse_params({**TINY, "final": {"seeds": [1, 2]}})
    info = data.load_info(prepared)
    chosen_results(tmp_path, info)
    paths = Outputs(tmp_path).final("search")
    trained, real_train = [], final.baseline.train

    def stop_at_seed_2(params, cfg, seed, *args, **kwargs):
        trained.append((seed, cfg.log10_l2))
        if seed == 2 and len(trained) == 2:
            raise Interrupt
        return real_train(params, cfg, seed, *args, **kwargs)

    monkeypatch.setattr(final.baseline, "train", stop_at_seed_2)
    with pytest.raises(Interrupt):
        final.run(params, prepared, "search", paths, root=tmp_path)
    chosen_results(tmp_path, info, search_l2=-1.5)
    final.run(params, prepared, "search", paths, root=tmp_path)
    assert trained == [(1, -3.0), (2, -4.0), (1, -1.5), (2, -2.5)]


def test_every_adaptive_finalist_seed_trains_from_its_own_seed(prepared, tmp_path, monkeypatch):
    """The seed reaches the adaptive trainer and its initialisation, for both adaptive rows."""
    from pipeline.experiments import adaptive as adaptive_run
    seen, real_init, real_build = [], adaptive_run.AdaptiveTrainer.__init__, adaptive_run.build_densenet

    def trainer_init(self, model, x, y, val_x, val_y, cfg, seed, *args, **kwargs):
        seen.append(("trainer", seed))
        real_init(self, model, x, y, val_x, val_y, cfg, seed, *args, **kwargs)

    def build(cfg, info, seed):
        seen.append(("init", seed))
        return real_build(cfg, info, seed)
    monkeypatch.setattr(adaptive_run.AdaptiveTrainer, "__init__", trainer_init)
    monkeypatch.setattr(adaptive_run, "build_densenet", build)
    params = parse_params({**TINY, "final": {"seeds": [4, 9]}})
    final.run(params, prepared, "adaptive", Outputs(tmp_path).final("adaptive"), root=tmp_path)
    assert seen == [(kind, seed) for _ in ("thesis", "baseline-schedule") for seed in (4, 9) for kind in ("init", "trainer")]
