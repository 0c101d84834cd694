"""Run by tests/test_data_parallel.py, alone or under torchrun: K training steps of a small
float64 network without BatchNorm (convolution, dropout, linear), then a DrMAD hypergradient of
per-parameter log10 L2 over that training with each HVP. Rank 0 writes the weights and
hypergradients to OUT (`pipeline.io` drops the other ranks' writes)."""
import sys

import torch
from torch import nn

from pipeline import data_parallel, io
from pipeline.config import TrainConfig
from pipeline.experiments.drmad import problem_for
from pipeline.hypergrad.problem import flat
from pipeline.hyper import HyperSpace
from pipeline.hypergrad.drmad import LinePath, step_map
from pipeline.hypergrad.reverse import reverse
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.models import MaskedDropout
from pipeline.training import Trainer, setup_device

SEED, EPOCHS, BATCH = 3, 3, 16


def network() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), MaskedDropout(0.3), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 10)).double()


def main(out: str) -> None:
    device = setup_device("cpu", threads=1)
    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(96, 1, 6, 6, generator=g, dtype=torch.float64), torch.randint(0, 10, (96,), generator=g)
    splits = {"train": (x[:64], y[:64]), "val": (x[64:], y[64:])}
    model = network().to(device)
    w0 = flat(model.parameters())
    cfg = TrainConfig(epochs=EPOCHS, batch_size=BATCH, alpha=0.5, momentum=0.9, nesterov=False, log10_l2=-3.0)
    l2 = HyperSpace.l2(model, -3.0, "parameter", bounds=(-12.0, 0.0), device=device)
    trainer = Trainer(model, *splits["train"], cfg, SEED, {n: 2 * l2.value(n) for n in l2.shapes})
    epochs = [trainer.run_epoch() for _ in range(EPOCHS)]  # (mean loss, error) of each epoch's batches
    problem = problem_for(trainer, splits, SEED, w0)
    steps = problem.steps
    hypergradients = {}
    for name, hvp in HVP_METHODS.items():
        path = LinePath(problem.w0, flat(trainer.params), steps, step_map("same", steps, steps))
        grads = reverse(problem, path, l2, hvp)["log10_l2"]
        hypergradients[name] = torch.cat([grads[k].reshape(-1) for k in sorted(grads)])
    io.save_torch(out, {"weights": flat(trainer.params), "losses": [float(loss) for loss, _ in epochs],
                        "train_errors": [float(error) for _, error in epochs], "hypergradients": hypergradients,
                        "world_size": data_parallel.world_size()})


if __name__ == "__main__":
    main(sys.argv[1])
