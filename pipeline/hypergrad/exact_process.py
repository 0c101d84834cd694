"""Exact reversal in a second process, beside the float methods in this one.

Per meta-iteration the quality study trains and reverses one seed in fixed point (exact) and in
floats (float reversal, the DrMAD lines). The two share nothing but their inputs, so on two cores
a child process does the exact half while this one does the rest. The child runs the very
functions the one-process code runs (`ExactPath.train`, `Walk`), at the same thread count, so
every result is the same bits (tests/test_exact_process.py); it sends back the `Snapshot`s that
`compare_walks` traces and the exact hypergradients.

PIPELINE_EXACT_PROCESS: `auto` (default) uses the child on the CPU when this stage's share of
the cores (`auto_threads`: the cores divided among the processes sharing them) holds both
processes at `threads` threads each, `1` always, `0` never.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import queue
import threading
import time
import traceback
from typing import Iterator

import torch

from pipeline.hyper import HyperSpace
from pipeline.hypergrad.hvp import HVP_METHODS
from pipeline.hypergrad.trajectories import ExactPath
from pipeline.hypergrad.problem import Problem
from pipeline.hypergrad.reverse import Snapshot, Walk


def wanted(device: str, threads: int | str) -> bool:
    """Whether a stage on `device` (params.yaml's) at `threads` threads uses the child."""
    from pipeline.training import auto_threads, resolve_device

    mode = os.environ.get("PIPELINE_EXACT_PROCESS", "auto")
    if mode != "auto":
        return mode == "1"
    per_process = auto_threads() if threads == "auto" else threads
    return resolve_device(device).type == "cpu" and auto_threads() >= 2 * per_process


def for_params(device: str, threads: int | str, hvp: str) -> "ExactProcess | contextlib.nullcontext":
    """A context giving the child (None when not wanted); start it early, before heavy imports."""
    if not wanted(device, threads):
        return contextlib.nullcontext()
    from pipeline.training import auto_threads

    return ExactProcess(hvp, auto_threads() if threads == "auto" else threads)


_END = pickle.dumps(None, protocol=pickle.HIGHEST_PROTOCOL)
INBOX_BYTES = 256 << 20


def _send(conn, obj) -> None:
    # Plain pickle: torch's multiprocessing pickler would move tensors into shared memory.
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def _receive(conn):
    return pickle.loads(conn.recv_bytes())


def _numpy(t: torch.Tensor):
    return t.detach().cpu().numpy().copy()


def _serve(conn, hvp: str, threads: int) -> None:
    """The child: reads the problem, its L2 and trace rows, then per job (the buffer
    hyperparameters' values) trains in fixed point, walks back, streams the kept snapshots, then
    the result and the CPU seconds its jobs took so far; None ends it."""
    import tqdm

    from pipeline.training import make_deterministic

    # Kernels compile in this process: a pool of compile workers would outlive os._exit below.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    # A first compile makes a (hidden) tqdm bar, and tqdm's default lock is a multiprocessing
    # semaphore that os._exit would leave for the resource tracker to report as leaked.
    tqdm.tqdm.set_lock(threading.RLock())
    make_deterministic()
    torch.set_num_threads(threads)
    problem, l2, keep = _receive(conn)
    cpu_s = 0.0
    while (values := _receive(conn)) is not None:
        started = time.process_time()
        try:
            for key, value in values.items():
                problem.scales.values[key].copy_(value)
            path = ExactPath.train(problem, problem.l2_coefficients(l2))
            walk = Walk(problem, path, l2, HVP_METHODS[hvp], keep)
            for snap in walk:
                _send(conn, ("snapshot", snap.step, *(_numpy(t) for t in (snap.w, snap.v, snap.d_theta, snap.dw))))
            cpu_s += time.process_time() - started
            _send(conn, ("done", walk.result, walk.w_T, cpu_s))
        except Exception as error:  # sent back: the parent raises it where the one-process code would
            try:
                pickle.dumps(error)
            except Exception:
                error = RuntimeError(f"exact reversal process: {traceback.format_exc()}")
            _send(conn, ("error", error))
    _send(conn, ("exit",))
    conn.close()
    os._exit(0)  # skip the interpreter's teardown (a second of finalisers): nothing is left to flush


class RemoteWalk:
    """The child's exact walk as this process sees it: iterate for its snapshots; then `result`,
    `w_T` (the exact w_T) and `cpu_s` (the child's CPU seconds so far)."""

    def __init__(self, owner: "ExactProcess"):
        self.owner, self.result, self.w_T = owner, None, None

    def __iter__(self) -> Iterator[Snapshot]:
        device, dtype = self.owner.device, self.owner.dtype
        while True:
            kind, *body = self.owner.receive()
            if kind in ("error", "done"):
                self.owner.busy = False
            if kind == "error":
                raise body[0]
            if kind == "done":
                self.result, self.w_T, self.owner.cpu_s = body
                return
            step, *tensors = body
            yield Snapshot(step, *(torch.from_numpy(t).to(device, dtype) for t in tensors))


class ExactProcess:
    """A child process serving exact reversals with `hvp` (a key of HVP_METHODS) at `threads`
    intra-op threads (this process's): `load` gives it the problem, `start(values)` begins a reversal for
    the buffer hyperparameters' `values`, `walk()` follows it. A context manager: leaving it
    ends the child. It starts at once, so it imports torch while this process prepares."""

    def __init__(self, hvp: str, threads: int):
        context = multiprocessing.get_context("spawn")  # fork would copy OpenMP and compiler state
        self._conn, child = context.Pipe()
        self.cpu_s, self.busy = 0.0, False
        self._process = context.Process(target=_serve, name="exact reversal", daemon=True,
                                        args=(child, hvp, threads))
        self._process.start()
        child.close()
        # Sends go through a thread: the child reads its first message (the problem, megabytes,
        # more than a pipe holds) only once it has imported torch, seconds later.
        self._outbox: queue.Queue = queue.Queue()
        threading.Thread(target=self._send_posted, name="exact reversal sender", daemon=True).start()

    def load(self, problem: Problem, l2: HyperSpace | None, keep: set[int] | None) -> None:
        """The problem to reverse (with its fixed L2 and the trace rows to send back)."""
        self.device, self.dtype = problem.x.device, problem.dtype
        self._post((problem, l2, keep))  # pickled here: the module is not to be read while a loss runs
        # Received through a thread too, so the child runs ahead while this process is busy
        # elsewhere (up to INBOX_BYTES of snapshots, three P-vectors each).
        self._inbox: queue.Queue = queue.Queue(maxsize=max(4, INBOX_BYTES // (24 * problem.numel)))
        threading.Thread(target=self._receive_posted, name="exact reversal receiver", daemon=True).start()

    def _receive_posted(self) -> None:
        while True:
            try:
                message = _receive(self._conn)
            except (EOFError, OSError):
                return  # the child is gone: `receive` says so
            self._inbox.put(message)
            if message[0] == "exit":
                return

    def _post(self, message) -> None:
        self._outbox.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_posted(self) -> None:
        while True:
            message = self._outbox.get()
            try:
                self._conn.send_bytes(message)
            except OSError:
                return  # the child is gone: `receive` says so
            if message == _END:
                return

    def start(self, values: dict[str, torch.Tensor]) -> None:
        self._post({k: v.detach().cpu() for k, v in values.items()})
        self.busy = True

    def walk(self) -> RemoteWalk:
        return RemoteWalk(self)

    def receive(self):
        """The child's next message; an error once it is gone (polled: a child that died before
        reading its arguments leaves their pipe open, and a plain read would wait forever)."""
        while True:
            try:
                return self._inbox.get(timeout=1.0)
            except queue.Empty:
                if not self._process.is_alive() and self._inbox.empty():
                    self.busy = False
                    self._process.join(5)
                    raise RuntimeError(f"the exact reversal process ended (exit code {self._process.exitcode})")

    def close(self) -> None:
        """Ends the child (once): at once when a job was left unfinished (this side failed
        mid-way), else when it has read the end."""
        if self._conn.closed:
            return
        if not self.busy:
            self._post(None)
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> "ExactProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
