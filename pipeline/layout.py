"""Where every stage's outputs live, named once: writers and readers both ask `Outputs(root)`.

One rule, the stage then its instance (the foreach key of dvc.yaml), for every kind of file:
    results/<stage>/<instance>...      what a later stage reads (DVC-cached)
    metrics/<stage>/<instance>.json    results (`dvc metrics`); metrics/<stage>.json for one-instance stages
    timings/<stage>/<instance>.json    the same run's wall times, throughputs and platform (`timings_of`):
                                       machine-dependent, so kept apart and identical results leave metrics/ as is
    plots/<stage>/<instance>/...       long tables (`dvc plots`); plots/<stage>/... for one-instance stages
    figures/<stage>/<instance>/        figures drawn by the stage
    checkpoints/<stage>/<instance>...  resumable state, removed when the stage ends
dvc.yaml's `outs` spell the same paths (tests/test_layout.py checks they agree).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STAGES = ("prepare", "baseline", "drmad", "adaptive", "search", "tune", "final", "arena", "quality", "trajectory", "report")
SINGLE_INSTANCE = ("prepare", "baseline", "trajectory", "report")  # the others are foreach stages: <stage>@<instance>


def timings_of(metrics: Path) -> Path:
    """Where the timings of a results file live: metrics/X -> timings/X, results/X -> timings/X,
    elsewhere (reports/verdict.json) a `_timings` sibling."""
    parts = metrics.parts
    for top in ("metrics", "results"):
        if top in parts:
            i = len(parts) - 1 - parts[::-1].index(top)
            return Path(*parts[:i], "timings", *parts[i + 1:]).with_suffix(".json")
    return metrics.with_name(f"{metrics.stem}_timings.json")


@dataclass(frozen=True)
class BaselineOutputs:
    model: Path
    metrics: Path
    per_epoch: Path
    checkpoint: Path


@dataclass(frozen=True)
class DrmadOutputs:
    hypers: Path
    metrics: Path
    meta_csv: Path
    epochs_csv: Path
    layers_csv: Path
    checkpoint: Path


@dataclass(frozen=True)
class AdaptiveOutputs:
    hypers: Path
    metrics: Path
    epochs_csv: Path
    layers_csv: Path
    checkpoint: Path
    model: Path | None = None  # the trained weights, when wanted (the finalists evaluate them per image)


@dataclass(frozen=True)
class SearchOutputs:
    best: Path
    metrics: Path
    trials_csv: Path
    storage_dir: Path  # the studies' Optuna storage, NAME.db, unless search.storage names a server


@dataclass(frozen=True)
class TuneOutputs:
    choices: Path  # per method and seed: what the finalist retrains (torch: DrMAD's are tensors)
    metrics: Path
    work_dir: Path


@dataclass(frozen=True)
class FinalOutputs:
    metrics: Path
    epochs_csv: Path
    work_dir: Path  # finished runs and the checkpoint of the one in progress


@dataclass(frozen=True)
class QualityOutputs:
    metrics: Path
    hypergrads_csv: Path
    errors_csv: Path
    reverse_csv: Path
    figures: Path
    checkpoint: Path


@dataclass(frozen=True)
class TrajectoryOutputs:
    metrics: Path
    path_csv: Path
    coordinates_csv: Path
    figures: Path


@dataclass(frozen=True)
class ReportOutputs:
    summary_md: Path
    summary_csv: Path
    quality_csv: Path
    figures: Path
    verdict_json: Path  # `dvc metrics diff` reads it
    verdict_seeds: Path


@dataclass(frozen=True)
class Outputs:
    root: Path = Path(".")

    def baseline(self) -> BaselineOutputs:
        r = self.root
        return BaselineOutputs(r / "models/baseline.pt", r / "metrics/baseline.json", r / "plots/baseline/errors.csv",
                               r / "checkpoints/baseline.pt")

    def drmad(self, tag: str) -> DrmadOutputs:
        """The instance whose initial log10 L2 is written `tag` (as in params.yaml: -4.0)."""
        r, plots = self.root, self.root / f"plots/drmad/{tag}"
        return DrmadOutputs(r / f"results/drmad/{tag}/hypers.pt", r / f"metrics/drmad/{tag}.json", plots / "meta.csv",
                            plots / "epochs.csv", plots / "layers.csv", r / f"checkpoints/drmad/{tag}.pt")

    def adaptive(self, name: str) -> AdaptiveOutputs:
        r, plots = self.root, self.root / f"plots/adaptive/{name}"
        return AdaptiveOutputs(r / f"results/adaptive/{name}/hypers.pt", r / f"metrics/adaptive/{name}.json",
                               plots / "epochs.csv", plots / "layers.csv", r / f"checkpoints/adaptive/{name}.pt")

    def search(self, name: str) -> SearchOutputs:
        r = self.root
        return SearchOutputs(r / f"results/search/{name}/best.json", r / f"metrics/search/{name}.json",
                             r / f"plots/search/{name}/trials.csv", r / "checkpoints/search")

    def tune(self, kind: str) -> TuneOutputs:
        r = self.root
        return TuneOutputs(r / f"results/tune/{kind}.pt", r / f"metrics/tune/{kind}.json", r / f"checkpoints/tune/{kind}")

    def final(self, kind: str) -> FinalOutputs:
        r = self.root
        return FinalOutputs(r / f"metrics/final/{kind}.json", r / f"plots/final/{kind}.csv", r / f"checkpoints/final/{kind}")

    def arena(self, seed: int | str) -> Path:
        return self.root / f"results/arena/{seed}.json"

    def arena_results(self) -> list[Path]:
        """The MLP arena's finished seeds, in seed order."""
        return sorted((self.root / "results/arena").glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1)

    def quality(self, name: str) -> QualityOutputs:
        r, plots = self.root, self.root / f"plots/quality/{name}"
        return QualityOutputs(r / f"metrics/quality/{name}.json", plots / "hypergrads.csv", plots / "errors.csv",
                              plots / "reverse.csv", r / f"figures/quality/{name}", r / f"checkpoints/quality/{name}.pt")

    def trajectory(self) -> TrajectoryOutputs:
        r = self.root
        return TrajectoryOutputs(r / "metrics/trajectory.json", r / "plots/trajectory/path.csv",
                                 r / "plots/trajectory/coordinates.csv", r / "figures/trajectory")

    def report(self) -> ReportOutputs:
        r = self.root / "reports"
        return ReportOutputs(r / "summary.md", r / "summary.csv", r / "quality.csv", r / "figures", r / "verdict.json",
                             r / "verdict_seeds.csv")

    def instances(self, stage: str) -> list[str]:
        """The instances of a foreach stage that have written their metrics, sorted by name."""
        return sorted(p.stem for p in (self.root / "metrics" / stage).glob("*.json"))
