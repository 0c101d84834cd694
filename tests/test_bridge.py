"""The bridge from what the stages train to what the hypergradients differentiate: the Trainer's
own w_T (module forward, BatchNorm in training mode, foreach updates) equals the hypergradient
problem's forward trajectory (functional forward, batch statistics only) for the drmad and
adaptive settings, batch for batch and mask for mask, and the problem's model has no BatchNorm
running statistics a hypergradient could touch. (The quality stage trains its problem directly;
tests/test_quality.py checks that trajectory against a loop written out by hand.)"""
import math

import torch

from pipeline.adaptive import AdaptiveSettings, AdaptiveTrainer
from pipeline.config import parse_params
from pipeline.experiments.drmad import problem_for
from pipeline.hyper import HyperSpace
from pipeline.hypergrad import FloatPath, unrolled
from pipeline.models import DenseNet
from pipeline.training import Trainer
from helpers import rel

F64 = torch.float64


def densenet_data(seed=0):
    torch.manual_seed(seed)
    model = DenseNet(depth=7, growth_rate=4, init_maps=4, dropout=0.2, in_channels=1).to(F64)
    x, vx = torch.randn(48, 1, 8, 8, dtype=F64), torch.randn(16, 1, 8, 8, dtype=F64)
    y, vy = torch.randint(0, 10, (48,)), torch.randint(0, 10, (16,))
    return model, {"train": (x, y), "val": (vx, vy)}


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def test_the_drmad_trainer_and_its_problem_follow_one_trajectory():
    model, splits = densenet_data()
    cfg = parse_params({"drmad": {"batch_size": 16, "momentum": 0.9}}).drmad.train_config(epochs=2)
    l2 = HyperSpace.l2(model, -3.0, "unit", dtype=F64)
    w0 = flat(model.parameters())
    trainer = Trainer(model, *splits["train"], cfg, 5, {n: 2 * l2.value(n) for n in l2.shapes}, track_distance=True)
    for _ in range(cfg.epochs):
        trainer.run_epoch()
    problem = problem_for(trainer, splits, 5, w0)
    assert problem.steps == 6 and torch.equal(problem.w0, w0)
    path = FloatPath.train(problem, problem.l2_coefficients(l2))
    assert rel(path.w(), flat(trainer.params)) <= 1e-12
    assert torch.allclose(path.distances, torch.stack(trainer.distances), rtol=1e-12, atol=0)  # gamma's input
    assert not any(b.numel() for n, b in problem.model.named_buffers() if "running" in n)  # no running statistics


def test_the_adaptive_window_is_the_trainers_last_steps():
    model, splits = densenet_data(1)
    cfg = parse_params({}).adaptive.model_copy(update={"batch_size": 16}).train_config(momentum=0.9)
    l2 = HyperSpace.l2(model, -3.0, "thesis", dtype=F64)
    lr = HyperSpace.create({n: p.shape for n, p in model.named_parameters()}, "log_lr", -0.3, "thesis",
                           base=math.e, select=lambda name: True)
    trainer = AdaptiveTrainer(model, *splits["train"], *splits["val"], cfg, 3, l2, lr,
                              AdaptiveSettings(every=1000, window=3, l2_step=0.0, lr_step=0.0))
    trainer.run_epoch()  # 3 steps: the stored window is all of them
    problem, path = trainer.problem(trainer.state.step - 1)
    assert problem.first_step == 0 and problem.steps == 3
    w_T = unrolled.train(problem, l2, problem.alpha.to(F64), problem.beta.to(F64), problem.w0.clone().requires_grad_(),
                         create_graph=False)
    assert rel(w_T.detach(), flat(trainer.params)) <= 1e-12
    assert torch.equal(path.w(), flat(trainer.params))
