"""What many test files share: tiny DenseNet settings, a recording stand-in for the stage's MLflow
run, the exception a test raises to kill a run, and the relative error of two tensors."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

from pipeline.config import Params, parse_params

# A DenseNet small enough for the CPU, on 96 training images (3 steps an epoch in batches of 32);
# the shipped adaptive variants, k131 on the prepared split (its 400 validation images would not fit).
TINY = {"device": "cpu", "data": {"val_size": 60, "test_size": 60, "train_size": 96},
        "model": {"depth": 7, "growth_rate": 4, "init_maps": 4},
        "adaptive": {"variants": {"k100": {}, "k131": {"every": 26, "window": 4, "momentum": 0.95, "l2_step": 0.02,
                                                       "lr_step": 0.1, "val_size": None}}}}
REPLACED = ("variants",)  # a test's own variants replace these whole (merging would keep k100 and k131)


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in at every depth (a mapping into a mapping key by key, any
    other value replaces); neither argument is modified."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key not in REPLACED:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_settings(base: dict | None = None, /, **overrides) -> dict:
    """The settings `base` (default: TINY) with `overrides` merged in at every depth."""
    return merged(TINY if base is None else base, overrides)


def tiny_params(base: dict | None = None, /, **overrides) -> Params:
    """`tiny_settings(base, **overrides)`, validated."""
    return parse_params(tiny_settings(base, **overrides))


class Interrupt(Exception):
    """Raised by a test to stop a run part-way, as a kill would."""


def rel(a, b) -> float:
    """Relative error of tensor `a` against the reference `b` (2-norms)."""
    return ((a - b).norm() / b.norm()).item()


class RecordingTracker:
    """A stand-in for a stage's MLflow run (pipeline.tracking.StageRun) that records every call.

    `stop_at_step`: raise Interrupt once metrics of that step are logged (recorded first), as a
    kill after an epoch is logged and before its checkpoint. `stop_at_trial`: raise Interrupt when
    the nested run of that search trial is opened.
    """

    def __init__(self, stop_at_step: int | None = None, stop_at_trial: int | None = None,
                 name: str | None = None, params: dict | None = None):
        self.stop_at_step, self.stop_at_trial = stop_at_step, stop_at_trial
        self.name, self.params = name, dict(params or {})  # a child run's name and params
        self.calls: list[tuple] = []  # every call, in order: (method, *arguments)
        self.metrics: list[tuple[dict, int | None]] = []
        self.parent_metrics: list[dict] = []
        self.artifacts: list[tuple[str, str | None]] = []
        self.parent_artifacts: list[tuple[str, str | None]] = []
        self.tags: dict[str, str] = {}
        self.figures: list[str] = []
        self.tables: list[tuple[object, str]] = []
        self.children: list[RecordingTracker] = []
        self.status: str | None = None  # a child run's end: FINISHED, or FAILED when its block raised

    @property
    def epochs(self) -> list[int | None]:
        """The steps at which an epoch's metrics (error/test) were logged."""
        return [step for metrics, step in self.metrics if "error/test" in metrics]

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self.calls.append(("log_metrics", dict(metrics), step))
        self.metrics.append((dict(metrics), step))
        if self.stop_at_step is not None and step == self.stop_at_step:
            raise Interrupt

    def log_parent_metrics(self, metrics: dict) -> None:
        self.calls.append(("log_parent_metrics", dict(metrics)))
        self.parent_metrics.append(dict(metrics))

    def set_tag(self, key: str, value: str) -> None:
        self.calls.append(("set_tag", key, value))
        self.tags[key] = value

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.calls.append(("log_artifact", str(path), artifact_path))
        self.artifacts.append((str(path), artifact_path))

    def log_parent_artifact(self, path, artifact_path: str | None = None) -> None:
        self.calls.append(("log_parent_artifact", str(path), artifact_path))
        self.parent_artifacts.append((str(path), artifact_path))

    def log_figure(self, figure, name: str) -> None:
        from matplotlib import pyplot as plt  # the caller already chose the backend

        self.calls.append(("log_figure", name))
        self.figures.append(name)
        plt.close(figure)  # as StageRun does: the name is what is kept

    def log_table(self, table, name: str) -> None:
        self.calls.append(("log_table", name))
        self.tables.append((table, name))

    @contextmanager
    def child(self, name: str, params: dict) -> Iterator[RecordingTracker]:
        self.calls.append(("child", name, dict(params)))
        if self.stop_at_trial is not None and params.get("trial") == self.stop_at_trial:
            raise Interrupt
        run = RecordingTracker(name=name, params=params)
        self.children.append(run)
        run.status = "FAILED"
        yield run
        run.status = "FINISHED"
