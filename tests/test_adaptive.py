"""The adaptive method's trainer: hypergradients through the last M stored steps."""
import math

import pytest
import torch

from pipeline.adaptive import AdaptiveSettings, AdaptiveTrainer
from pipeline.config import TrainConfig
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import hypergradient, log_lr_hypergradient
from pipeline.models import DenseNet
from pipeline.training import Trainer
from helpers import rel

F64 = torch.float64


def setup(seed=0, sharing="unit"):
    torch.manual_seed(seed)
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1).to(F64)
    x, vx = torch.randn(64, 1, 8, 8, dtype=F64), torch.randn(40, 1, 8, 8, dtype=F64)
    y, vy = torch.randint(0, 10, (64,)), torch.randint(0, 10, (40,))
    shapes = {n: p.shape for n, p in model.named_parameters()}
    l2 = HyperSpace.l2(model, -3.0, sharing, bounds=(-6.0, -1.0))
    lr = HyperSpace.create(shapes, "log_lr", math.log(0.5), sharing, base=math.e, bounds=(-math.inf, 0.0),
                           select=lambda name: True)
    cfg = TrainConfig(epochs=3, batch_size=16, alpha=1.0, momentum=0.9, nesterov=False,
                      schedule={"milestones": [], "factor": 0.1})
    return model, x, y, vx, vy, cfg, l2, lr


def flat(d):
    return torch.cat([v.reshape(-1) for v in d.values()])


@pytest.mark.parametrize("sharing", ["unit", "parameter"])
def test_window_hypergradient_equals_unrolled_through_those_steps(sharing):
    model, x, y, vx, vy, cfg, l2, lr = setup(sharing=sharing)
    trainer = AdaptiveTrainer(model, x, y, vx, vy, cfg, 0, l2, lr, AdaptiveSettings(every=10_000, window=4))
    for _ in range(6):  # w_0 .. w_6; the window is steps 2..5 (non-zero starting velocity)
        step = trainer.state.step
        trainer.update(step, trainer.grad(step)[0])
        trainer.state.step += 1
    d_l2, d_eta = trainer.hypergradients(5)
    problem, _ = trainer.problem(5)
    reference = hypergradient(problem, l2, "unrolled")
    assert rel(flat(d_l2), flat(reference["log10_l2"])) <= 1e-6
    assert rel(flat(d_eta), flat(log_lr_hypergradient(problem, reference, lr))) <= 1e-6


def test_zero_hyper_steps_are_bit_identical_to_plain_training():
    model, x, y, vx, vy, cfg, l2, lr = setup()
    adaptive = AdaptiveTrainer(model, x, y, vx, vy, cfg, 0, l2, lr,
                               AdaptiveSettings(every=3, window=2, l2_step=0.0, lr_step=0.0))
    twin, *_ = setup()
    plain = Trainer(twin, x, y, cfg, 0, {n: 2 * l2.value(n) for n in l2.shapes})
    plain.lr_scales = [lr.value(n).to(p) for n, p in zip(plain.names, plain.params)]
    for _ in range(cfg.epochs):
        assert adaptive.run_epoch() == plain.run_epoch()
    assert adaptive.updates > 0  # hypergradients were computed, and changed nothing
    for a, b in zip(adaptive.params, plain.params):
        assert torch.equal(a, b)


def test_bounds_hold_after_every_update(monkeypatch):
    model, x, y, vx, vy, cfg, l2, lr = setup()
    trainer = AdaptiveTrainer(model, x, y, vx, vy, cfg, 0, l2, lr,
                              AdaptiveSettings(every=2, window=2, l2_step=2.0, lr_step=2.0))
    original = AdaptiveTrainer.hyper_step
    checked = []

    def checked_step(self, step):
        original(self, step)
        checked.append(step)
        assert all(bool(((v >= -6.0) & (v <= -1.0)).all()) for v in self.l2.values.values())
        assert all(bool((v <= 0.0).all()) for v in self.lr.values.values())

    monkeypatch.setattr(AdaptiveTrainer, "hyper_step", checked_step)
    trainer.run_epoch()
    assert len(checked) == trainer.steps_per_epoch // 2


def test_a_floor_schedule_of_its_own_bounds_eta_by_step():
    """Thesis 3.2.2's proposal: a fixed step alpha * e^eta that never falls below the baseline
    schedule's rate (floor_factor 1, schedule /10 at 50%)."""
    from pipeline.experiments.adaptive import eta_floor
    from pipeline.config import AdaptiveConfig
    cfg = AdaptiveConfig(schedule={"milestones": []}, lr_floor=True, floor_factor=1.0,
                         floor_schedule={"milestones": [0.5], "factor": 0.1})
    floor = eta_floor(cfg, 0.9)
    assert [floor(t, 100) for t in (0, 49, 50, 99)] == pytest.approx([0.0, 0.0, math.log(0.1), math.log(0.1)])
    assert eta_floor(cfg.model_copy(update={"lr_floor": False}), 0.9) is None


def test_rates_rise_above_the_initial_rate_up_to_the_absolute_ceiling(monkeypatch):
    """Thesis 2.4 / 3.2.2: the log learning rate is clipped below 0 with rates starting at 0.1, so a
    hypergradient that keeps saying "faster" raises every rate tenfold and no further. Through the
    stage's own hyperspaces (params.yaml -> bounds): alpha 1, momentum 0.9, so the rate
    alpha e^eta (1 - momentum) starts at 0.1; lr_max 1 puts the ceiling at eta = ln 10. The earlier
    reading (`lr_ceiling: initial`) keeps every rate at its start."""
    from pipeline.config import parse_params
    from pipeline.experiments.adaptive import hyperspaces

    def rates_after(updates, **adaptive):
        params = parse_params({"adaptive": {"alpha": 1.0, "init_log_lr": 0.0, **adaptive}})
        model, x, y, vx, vy, cfg, _, _ = setup()
        l2, lr = hyperspaces(params, model, momentum=0.9)
        trainer = AdaptiveTrainer(model, x, y, vx, vy, cfg, 0, l2, lr, AdaptiveSettings(every=1, window=1, lr_step=0.2))
        faster = {k: -torch.ones_like(v) for k, v in lr.values.items()}  # d val / d eta < 0: raise eta
        monkeypatch.setattr(trainer, "hypergradients", lambda step: ({k: torch.zeros_like(v) for k, v in l2.values.items()},
                                                                     faster))
        seen = []
        for step in range(updates):
            trainer.hyper_step(step)
            seen.append(max(v.max().item() for v in lr.values.values()))
        rates = torch.cat([v.reshape(-1) for v in lr.values.values()]).exp() * 1.0 * (1 - 0.9)
        return rates, seen

    rates, seen = rates_after(20)
    assert seen[0] == pytest.approx(0.2) and seen[5] == pytest.approx(1.2)  # above the start, one step at a time
    assert torch.allclose(rates, torch.full_like(rates, 1.0), rtol=1e-12)  # ln 10 / 0.2 = 11.5 steps: at the ceiling
    assert seen[-1] == pytest.approx(math.log(10.0), rel=1e-12)
    rates, _ = rates_after(5, lr_max=0.5)
    assert (rates < 0.5).all()  # 5 steps: e^1 x 0.1 < 0.5
    rates, _ = rates_after(20, lr_max=0.5)
    assert torch.allclose(rates, torch.full_like(rates, 0.5), rtol=1e-12)
    rates, _ = rates_after(20, lr_ceiling="initial")
    assert torch.allclose(rates, torch.full_like(rates, 0.1), rtol=1e-12)
