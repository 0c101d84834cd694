"""Data parallelism over W processes (ranks) on one machine, or started by torchrun across
machines (README "Scaling out").

On one machine (`processes: W` in params.yaml) the stage starts its own W ranks, which meet
through a file rather than torchrun's rendezvous (a TCP store listening on every interface,
unauthenticated) and talk over loopback only. A rank that fails stops the others.

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
import signal
import subprocess
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist

# A rank waiting for a peer that died: the launcher stops the others within seconds anyway.
TIMEOUT = timedelta(minutes=5)
STORE_FILE = "PIPELINE_RANKS_STORE"  # set by `relaunch`: the file the ranks meet through


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
    backend = "nccl" if device.type == "cuda" else "gloo"
    if STORE_FILE in os.environ:  # ranks started by `relaunch`, on this machine
        store = dist.FileStore(os.environ[STORE_FILE], world_size())
        dist.init_process_group(backend, store=store, rank=rank(), world_size=world_size(), timeout=TIMEOUT)
    else:
        dist.init_process_group(backend, timeout=TIMEOUT)
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
    """Run `module` (this stage, with the same arguments) as `processes` ranks on this machine and
    exit with their outcome; no-op for one process or when already a rank."""
    if processes == 1 or launched():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(run_ranks(processes, [sys.executable, "-m", module, *sys.argv[1:]]))


def run_ranks(processes: int, command: list[str]) -> int:
    """Start `processes` ranks of `command`, meeting through a file, their sockets on loopback;
    SIGINT/SIGTERM reach every rank; the first to fail stops the rest. The ranks' exit code."""
    with tempfile.TemporaryDirectory(prefix="ranks-") as scratch:
        env = {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes),
               STORE_FILE: os.path.join(scratch, "store"), "MASTER_ADDR": "127.0.0.1"}
        if sys.platform.startswith("linux"):  # gloo's and NCCL's own sockets: loopback only
            env.setdefault("GLOO_SOCKET_IFNAME", "lo")
            env.setdefault("NCCL_SOCKET_IFNAME", "lo")
        ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]

        def forward(signum, frame):
            for p in ranks:
                if p.poll() is None:
                    p.send_signal(signum)
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                codes = [p.poll() for p in ranks]
                if failed := next((c for c in codes if c not in (None, 0)), None):
                    forward(signal.SIGTERM, None)
                    for p in ranks:
                        p.wait()
                    return failed if failed > 0 else 128 - failed
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.1)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
