"""The training engine against independent references, and its determinism."""
import copy

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.models import DenseNet
from pipeline.training import BatchSchedule, Trainer, evaluate, is_regularised, step_sizes


def tiny_problem(seed=0, dropout=0.2, n=48, dtype=torch.float64):
    torch.manual_seed(seed)
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=dropout, in_channels=1).to(dtype)
    x = torch.randn(n, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 10, (n,))
    return model, x, y


def cfg(**kw):
    base = dict(epochs=3, batch_size=16, alpha=0.5, momentum=0.9, nesterov=False, log10_l2=-3.0)
    return TrainConfig(**{**base, **kw})


def train(model, x, y, config, seed):
    trainer = Trainer(model, x, y, config, seed)
    metrics = [trainer.run_epoch() for _ in range(config.epochs)]
    return trainer, metrics


@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_torch_sgd(nesterov):
    """alpha*(1-beta) is torch's lr and 2*10^l2 its weight_decay (on weights only)."""
    model, x, y = tiny_problem(dropout=0.0)
    reference = copy.deepcopy(model)
    config = cfg(nesterov=nesterov, schedule={"milestones": [0.5], "factor": 0.1})
    trainer, _ = train(model, x, y, config, seed=3)

    named = list(reference.named_parameters())
    opt = torch.optim.SGD([
        {"params": [p for n, p in named if is_regularised(n)], "weight_decay": 2 * 10 ** config.log10_l2},
        {"params": [p for n, p in named if not is_regularised(n)], "weight_decay": 0.0},
    ], lr=1.0, momentum=config.momentum, nesterov=nesterov)
    batches, alpha = BatchSchedule(len(x), config.batch_size, 3), step_sizes(config, trainer.total_steps)
    reference.train()
    for step in range(trainer.total_steps):
        for group in opt.param_groups:
            group["lr"] = alpha(step) * (1 - config.momentum)
        idx = batches.indices(step)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x[idx]), y[idx]).backward()
        opt.step()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-12, msg=name)


def test_same_seed_bit_identical_other_seed_different():
    runs = []
    for seed in (7, 7, 8):
        model, x, y = tiny_problem(dtype=torch.float32)
        trainer, metrics = train(model, x, y, cfg(), seed)
        runs.append((torch.cat([p.detach().flatten() for p in model.parameters()]),
                     torch.cat([b.flatten() for b in model.buffers() if b.is_floating_point()]),
                     metrics, evaluate(model, x, y, 20)))
    (w1, b1, m1, e1), (w2, b2, m2, e2), (w3, *_) = runs
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    assert m1 == m2 and e1 == e2
    assert not torch.equal(w1, w3)


def test_batches_and_masks_are_pure_functions_of_step():
    model, x, y = tiny_problem()
    trainer = Trainer(model, x, y, cfg(), seed=1)
    later_first = [trainer.batches.indices(s) for s in (7, 0, 7)]
    fresh = BatchSchedule(len(x), 16, 1)
    assert torch.equal(later_first[0], later_first[2]) and torch.equal(later_first[1], fresh.indices(0))
    # Each epoch is a permutation of the data.
    epoch = torch.cat([fresh.indices(s) for s in range(3)])
    assert sorted(epoch.tolist()) == list(range(48))
    loss_a, _ = trainer.loss(5)
    trainer.loss(2)
    loss_b, _ = trainer.loss(5)
    assert torch.equal(loss_a, loss_b)
    assert not torch.equal(loss_a, trainer.loss(4)[0])


def test_update_follows_the_design_formulas():
    model, x, y = tiny_problem(dropout=0.0)
    config = cfg(alpha=0.3, momentum=0.8)
    trainer = Trainer(model, x, y, config, seed=0)
    w0 = [p.detach().clone() for p in trainer.params]
    g0, *_ = trainer.grad(0)
    trainer.update(0, g0)
    g1, *_ = trainer.grad(1)
    trainer.update(1, g1)
    for w, a, b, p, v in zip(w0, g0, g1, trainer.params, trainer.state.velocity):
        v0 = -(1 - 0.8) * a
        v1 = 0.8 * v0 - (1 - 0.8) * b
        torch.testing.assert_close(v, v1, rtol=1e-12, atol=0)
        torch.testing.assert_close(p, w + 0.3 * v0 + 0.3 * v1, rtol=1e-12, atol=1e-15)


def test_l2_only_on_weights_and_batchnorm_scales():
    model, *_ = tiny_problem()
    names = [n for n, _ in model.named_parameters()]
    regularised = {n for n in names if is_regularised(n)}
    assert "features.0.weight" in regularised and "classifier.weight" in regularised
    bn_scales = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bn_scales <= regularised
    assert not any(n.endswith("bias") for n in regularised)


def test_step_schedule_divides_at_fractions():
    alpha = step_sizes(TrainConfig(epochs=8, alpha=1.0), total_steps=80)  # 10 steps per epoch
    assert [alpha(s) for s in (0, 39, 40, 59, 60, 79)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_weight_clip_bounds_every_weight():
    model, x, y = tiny_problem()
    trainer, _ = train(model, x, y, cfg(alpha=50.0, weight_clip=0.05, epochs=1), seed=0)
    assert max(p.abs().max().item() for p in trainer.params) <= 0.05


def test_precise_batchnorm_recomputes_the_population_statistics():
    """After precise BN, the first BatchNorm layer's running mean and variance are the mean and
    (unbiased, per batch, averaged) variance of its input over the training split."""
    from pipeline.training import precise_batchnorm
    torch.manual_seed(0)
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1).to(torch.float64)
    x = torch.randn(60, 1, 8, 8, dtype=torch.float64)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_mean.fill_(7.0)  # what a short run might have left
    precise_batchnorm(model, x, batch_size=20)
    with torch.no_grad():
        inputs = model.features[0](x)  # the first BatchNorm normalises the first convolution's output
    batches = inputs.split(20)
    mean = torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in batches]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-14)
    assert bn.momentum == 0.1  # restored


def test_auto_threads_divide_the_cores_among_the_processes_sharing_them(monkeypatch):
    from pipeline.training import auto_threads

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    for key in ("LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT", "PIPELINE_WORKERS"):
        monkeypatch.delenv(key, raising=False)
    assert auto_threads() == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    assert auto_threads() == 4
    monkeypatch.setenv("PIPELINE_WORKERS", "8")
    assert auto_threads() == 1  # never below one
