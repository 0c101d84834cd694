"""Data parallelism over W processes (ranks) started by torchrun (README "Scaling out").

Every rank holds the whole model and the whole training split. Step t's batch is the one a
single process would take (the seeded permutation of its epoch); rank r trains on rows
[r b/W, (r+1) b/W) of it under the same rows of the batch's dropout masks. Each rank's loss is
the mean over its rows, so the mean of the ranks' gradients (one all-reduce per step) is the
one-process gradient up to the rounding of the split sum. Hessian-vector products of the
reverse passes are averaged the same way, so exact reversal still recomputes every forward
gradient bit for bit: the all-reduce is deterministic for a fixed W.

Plain all-reduce rather than DistributedDataParallel: the training steps and reverse passes
take gradients with `torch.autograd.grad` (a pure function of (w, t)), which DDP's backward
hooks never see.

BatchNorm normalises with the statistics of the rows a rank sees (b/W examples), as DDP does
without SyncBatchNorm: a DenseNet trained on W ranks is not the one-process run. Evaluation
(precise BatchNorm statistics, validation and test errors) runs whole on every rank, so all
ranks keep equal weights and buffers. Rank 0 alone writes outputs and logs (`pipeline.io`,
`pipeline.tracking`); W = 1 runs the one-process code unchanged.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank waiting for a peer that died: torchrun stops the others within seconds anyway.
TIMEOUT = timedelta(minutes=5)


def world_size() -> int:
    """W, from torchrun's environment (known before `init` joins the group)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the torch.distributed environment)."""
    return "WORLD_SIZE" in os.environ


def init(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); returns this rank's
    device. Outside torchrun, or with one process, nothing happens."""
    if world_size() == 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def shard(rows: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch's rows (the batch size divides by W: `BatchSchedule` checks)."""
    w = world_size()
    if w == 1:
        return rows
    n = len(rows) // w
    return rows[rank() * n:(rank() + 1) * n]


def average(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The ranks' mean of each tensor, in one all-reduce (the inputs are left alone)."""
    w = world_size()
    if w == 1:
        return tensors
    flat = torch.cat([t.detach().reshape(-1).to(tensors[0].dtype) for t in tensors])
    dist.all_reduce(flat)
    flat /= w
    return [part.view(t.shape).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def total(count: torch.Tensor) -> torch.Tensor:
    """The ranks' sum of a count (an integer tensor)."""
    if world_size() == 1:
        return count
    count = count.clone()
    dist.all_reduce(count)
    return count


def relaunch(processes: int, module: str) -> None:
    """Replace this process by torchrun running `module` on `processes` ranks with the same
    arguments (the params' `processes` under `dvc repro`); no-op for one process or when
    already launched."""
    if processes == 1 or launched():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc-per-node={processes}", "-m", module, *sys.argv[1:]])
