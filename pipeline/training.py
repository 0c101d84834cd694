"""Seeded SGD in the thesis form (algorithms §3), with explicit batches and dropout masks.

    g_t     = grad L(w_t, theta, t)          L = CE(B_t, m_t; w) + sum 10^l2 * w^2
    v_t     = beta * v_{t-1} - (1 - beta) * g_t
    w_{t+1} = w_t + alpha_t * v_t            (Nesterov: w_t + alpha_t * (beta * v_t - (1 - beta) * g_t))

Batch order and dropout masks are pure functions of (seed, step), so any step can be
recomputed exactly later (the reverse passes rely on it) and an interrupted run resumes
with the very same numbers.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import data_parallel
from pipeline.config import PARAMS_FILE, ConfigError, TrainConfig
from pipeline.models import MaskedDropout, dropout_masks
from pipeline.seeds import BATCH_STREAM, MASK_STREAM, generator



def make_deterministic() -> None:
    """Same inputs, same bits (algorithms §3): exact reversal recomputes every gradient and needs
    the forward one's bits. Must run before any CUDA work (cuBLAS reads its workspace setting
    once), which is why `setup_device` calls it."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def setup_device(name: str, threads: int | str | None = None) -> torch.device:
    """The one way stages and benchmarks get their device: deterministic mode first, then the
    device (`auto`: CUDA when present). `threads`: intra-op CPU threads of this process (params.yaml
    `threads`, or `auto`: `auto_threads()`), set rather than inherited: a small model's step can be
    3x slower with two spinning OpenMP threads per process on two shared cores
    (bench/threads.py), and CPU reductions may round differently with another thread count, so
    results are bit-identical only at one setting."""
    make_deterministic()
    if threads is not None:
        torch.set_num_threads(auto_threads() if threads == "auto" else threads)
    return data_parallel.init(resolve_device(name))


def auto_threads() -> int:
    """The cores divided among the processes sharing them: this machine's torchrun ranks, pytest
    workers, and `PIPELINE_WORKERS` (set it to N for `dvc queue start -j N` or N helpers)."""
    sharers = 1
    for key in ("LOCAL_WORLD_SIZE", "PYTEST_XDIST_WORKER_COUNT", "PIPELINE_WORKERS"):
        sharers *= max(1, int(os.environ.get(key, 1)))
    return max(1, (os.cpu_count() or 1) // sharers)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{PARAMS_FILE}: device: cuda, but this machine has no usable CUDA device "
                          "(use auto or cpu)")
    return torch.device(name)


class BatchSchedule:
    """Batch of step t: a slice of the seeded permutation of epoch t // steps_per_epoch.

    Incomplete last batches are dropped so every step sees `batch_size` examples. Under data
    parallelism each rank gets its share of every batch (`data_parallel.shard`)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} is larger than the {n} training examples")
        if batch_size % data_parallel.world_size():
            raise ConfigError(f"{PARAMS_FILE}: batch_size {batch_size} does not split evenly over "
                              f"{data_parallel.world_size()} processes (choose processes that divide it)")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.steps_per_epoch = n // batch_size
        self._epoch, self._perm = -1, None

    def indices(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=generator(self.seed, BATCH_STREAM, epoch))
            self._epoch = epoch
        return data_parallel.shard(self._perm[k * self.batch_size:(k + 1) * self.batch_size])


def is_regularised(name: str) -> bool:
    """L2 on conv/linear weights and BatchNorm scales; never on biases or BatchNorm shifts."""
    return not name.endswith("bias")


def l2_penalty(named_params: dict[str, torch.Tensor], log10_l2: float) -> torch.Tensor:
    """R(w) = sum_j 10^l2 * w_j^2: the thesis/Lasagne convention, twice PyTorch's weight_decay."""
    return sum(10.0 ** log10_l2 * p.pow(2).sum() for n, p in named_params.items() if is_regularised(n))


def step_sizes(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """alpha_t of the step schedule: alpha times factor^(milestones passed), a milestone being
    a fraction of all steps (for whole epochs: the paper's "at 50% and 75% of the epochs")."""
    edges = [math.floor(f * total_steps) for f in cfg.schedule.milestones]

    def alpha(step: int) -> float:
        return cfg.alpha * cfg.schedule.factor ** sum(step >= e for e in edges)

    return alpha


@dataclass
class TrainState:
    """Everything a resumed run needs: weights and buffers live in the model."""
    velocity: list[torch.Tensor]
    step: int = 0
    history: list[dict] = field(default_factory=list)


class Trainer:
    """SGD on one model and one training split; `grad(step)` is the pure g_t of algorithms §3."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, seed: int,
                 l2_coefficients: dict[str, torch.Tensor] | None = None, track_distance: bool = False):
        """`l2_coefficients`: per-parameter c with grad R = c * w (2 * 10^lambda, a HyperSpace's
        values) replacing the scalar cfg.log10_l2. `track_distance`: record |w_t - w_0| per step
        (DrMAD's reverse-step heuristic)."""
        self.model, self.x, self.y, self.cfg, self.seed = model, x, y, cfg, seed
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.regularised = [p for n, p in zip(self.names, self.params) if is_regularised(n)]
        coefs = l2_coefficients or {}
        self.l2_coefficients = [coefs[n].to(p) if n in coefs else torch.full_like(p, 2 * 10.0 ** cfg.log10_l2)
                                for n, p in zip(self.names, self.params) if is_regularised(n)]
        self.w0 = [p.detach().clone() for p in self.params] if track_distance else None
        self.lr_scales: list[torch.Tensor] | None = None  # per-parameter alpha multipliers (e^eta)
        self.distances: list[torch.Tensor] = []
        self.batches = BatchSchedule(len(x), cfg.batch_size, seed)
        self.steps_per_epoch = self.batches.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.alpha = step_sizes(cfg, self.total_steps)
        self.state = TrainState([torch.zeros_like(p) for p in self.params])

    def loss(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of step `step`'s batch under its masks, and the batch's error count."""
        idx = self.batches.indices(step).to(self.x.device)
        x, y = self.x[idx], self.y[idx]
        self.model.train()
        with dropout_masks(self.model, generator(self.seed, MASK_STREAM, step, self.x.device)):
            logits = self.model(x)
        return F.cross_entropy(logits, y), (logits.argmax(1) != y).sum()

    def grad(self, step: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        loss, wrong = self.loss(step)
        *grads, loss = data_parallel.average([*torch.autograd.grad(loss, self.params), loss.detach()])
        wrong = data_parallel.total(wrong)
        # The L2 gradient in closed form: c * w (cheaper than through autograd).
        with torch.no_grad():
            reg = [g for n, g in zip(self.names, grads) if is_regularised(n)]
            torch._foreach_addcmul_(reg, self.regularised, self.l2_coefficients)
        return grads, loss, wrong

    @torch.no_grad()
    def update(self, step: int, grads: list[torch.Tensor]) -> None:
        alpha, beta, v = self.alpha(step), self.cfg.momentum, self.state.velocity
        torch._foreach_mul_(v, beta)
        torch._foreach_add_(v, grads, alpha=-(1 - beta))
        if self.cfg.nesterov:
            torch._foreach_add_(self.params, v, alpha=alpha * beta)
            torch._foreach_add_(self.params, grads, alpha=-alpha * (1 - beta))
        elif self.lr_scales is not None:
            torch._foreach_addcmul_(self.params, v, torch._foreach_mul(self.lr_scales, alpha))
        else:
            torch._foreach_add_(self.params, v, alpha=alpha)
        if self.cfg.weight_clip is not None:
            torch._foreach_clamp_min_(self.params, -self.cfg.weight_clip)
            torch._foreach_clamp_max_(self.params, self.cfg.weight_clip)
        if self.w0 is not None:
            diffs = torch._foreach_sub(self.params, self.w0)
            self.distances.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(diffs))))

    def run_epoch(self) -> tuple[float, float]:
        """Train one epoch; returns the running training loss and error over its batches
        (training mode, dropout on: free to compute, unlike a second pass)."""
        loss_sum = torch.zeros((), device=self.x.device)
        wrong_sum = torch.zeros((), device=self.x.device, dtype=torch.long)
        for _ in range(self.steps_per_epoch):
            step = self.state.step
            grads, loss, wrong = self.grad(step)
            self.update(step, grads)
            loss_sum += loss
            wrong_sum += wrong
            self.state.step += 1
        n = self.steps_per_epoch
        return loss_sum.item() / n, wrong_sum.item() / (n * self.cfg.batch_size)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "velocity": self.state.velocity,
                "step": self.state.step, "history": self.state.history}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            torch._foreach_copy_(self.state.velocity, state["velocity"])
        self.state.step, self.state.history = state["step"], list(state["history"])


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, float]:
    """(error rate, mean cross-entropy) in eval mode: BatchNorm running statistics, no dropout."""
    model.eval()
    loss, wrong = torch.zeros((), device=x.device), torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        logits = model(x[i:i + batch_size])
        loss += F.cross_entropy(logits, y[i:i + batch_size], reduction="sum")
        wrong += (logits.argmax(1) != y[i:i + batch_size]).sum()
    return wrong.item() / len(x), loss.item() / len(x)


@torch.no_grad()
def wrong_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[int]:
    """Indices of the examples the model gets wrong in eval mode: what paired comparisons of two
    models on one test split need (which images, not only how many)."""
    model.eval()
    wrong = [torch.nonzero(model(x[i:i + batch_size]).argmax(1) != y[i:i + batch_size]).flatten() + i
             for i in range(0, len(x), batch_size)]
    return torch.cat(wrong).tolist()


@torch.no_grad()
def precise_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Replace every BatchNorm layer's running statistics by the training split's population
    statistics (precise BN: the average of per-batch statistics over equal batches, dropout
    off), so that an evaluation in eval mode measures the weights, not a short run's running
    averages. Training never reads running statistics (it normalises with its batch's)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    model.train()
    for m in model.modules():
        if isinstance(m, MaskedDropout):
            m.eval()
    size = min(batch_size, len(x))
    for i in range(0, len(x) - size + 1, size):  # equal batches (a short last one would weigh as much)
        model(x[i:i + size])
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def train_epoch(trainer: Trainer, splits: dict[str, tuple[torch.Tensor, torch.Tensor]], epoch: int,
                batchnorm: str = "precise") -> dict:
    """One epoch, then val/test evaluation: the per-epoch row every stage records. `batchnorm`:
    `precise` recomputes BatchNorm population statistics over the training split first."""
    start = time.perf_counter()
    alpha = trainer.alpha(trainer.state.step)
    train_loss, train_error = trainer.run_epoch()
    row = {"epoch": epoch, "alpha": alpha, "train_error": train_error, "train_loss": train_loss}
    if batchnorm == "precise":
        precise_batchnorm(trainer.model, splits["train"][0], trainer.cfg.eval_batch_size)
    for split in ("val", "test"):
        row[f"{split}_error"], row[f"{split}_loss"] = evaluate(trainer.model, *splits[split], trainer.cfg.eval_batch_size)
    row["seconds"] = time.perf_counter() - start
    return row


def finite_losses(row: dict) -> bool:
    return all(math.isfinite(row[f"{split}_loss"]) for split in ("train", "val", "test"))


def final_errors(rows: list[dict], outcome: str, last_n: int, index: str) -> dict:
    """The result errors of a run from its rows (epochs or meta-iterations) whose losses were
    finite: final, mean of the last n, best validation. A diverged run has no result: these are
    null, and its last finite row is kept under last_finite_* (with its `index`)."""
    keys = ("final_test_error", "final_val_error", "final_train_error", "mean_last_n_test_error", "best_val_error")
    out: dict = dict.fromkeys(keys)
    if outcome == "diverged":
        if rows:
            out.update({f"last_finite_{index}": rows[-1][index], "last_finite_test_error": rows[-1]["test_error"],
                        "last_finite_val_error": rows[-1]["val_error"]})
        return out
    if rows:
        last = rows[-last_n:]
        out.update(final_test_error=rows[-1]["test_error"], final_val_error=rows[-1]["val_error"],
                   final_train_error=rows[-1]["train_error"],
                   mean_last_n_test_error=sum(r["test_error"] for r in last) / len(last),
                   best_val_error=min(r["val_error"] for r in rows))
    return out


def epoch_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    """MLflow keys shared by every stage: error/{split}, loss/{split}, alpha."""
    out = {f"{prefix}alpha": row["alpha"]}
    for split in ("train", "val", "test"):
        out[f"{prefix}error/{split}"], out[f"{prefix}loss/{split}"] = row[f"{split}_error"], row[f"{split}_loss"]
    return out
