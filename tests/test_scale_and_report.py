"""The paper-scale switch and the report stage."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from pipeline.layout import Outputs
from pipeline import scale
from pipeline.experiments import report
from pipeline.models import build_densenet
from pipeline.config import ConfigError, load_params
from pipeline.quality_mlp import build_mlp
from pipeline.training import step_sizes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def paper(tmp_path):
    shutil.copytree(ROOT / "scales", tmp_path / "scales")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    scale.apply("paper", tmp_path / "params.yaml", tmp_path)
    return load_params(tmp_path / "params.yaml")


def test_paper_scale_validates_and_builds_the_thesis_models(paper):
    assert paper.data.source == "cifar10" and paper.data.test_size is None and paper.data.val_size == 5000
    densenet = build_densenet(paper.model, {"channels": 3, "num_classes": 10}, paper.seed)
    assert sum(p.numel() for p in densenet.parameters()) == 1_019_722  # DenseNet-40, k = 12
    mlp = build_mlp(paper.quality.protocols["thesis"], paper.seed, 28 * 28, 10)
    assert [layer.z.shape[1] for layer in mlp.layers] + [mlp.layers[-1].z.shape[0]] == [784, 50, 50, 50, 10]
    assert paper.quality.data.source == "mnist" and paper.quality.data.train_size == 15000
    assert paper.quality.variants["thesis-200000"].steps == 200_000 and "thesis-20000" in paper.quality.variants
    assert [paper.drmad.start_epochs(i) for i in (-4.0, -2.0, -7.0)] == [100, 10, 10]  # thesis: bad inits at 10
    assert paper.adaptive.schedule.milestones == [] and paper.adaptive.floor_schedule.milestones == [0.5, 0.75]
    assert paper.baseline.epochs == 300 and paper.drmad.epochs_cap == 300 and paper.adaptive.epochs == 300
    assert {k: (v.every, v.window, v.val_size) for k, v in paper.adaptive.variants.items()} == \
        {"k100": (100, 5, 10000), "k131": (131, 4, 14000)}
    alpha = step_sizes(paper.baseline, 300 * 100)  # /10 at 50% and at 75% of the steps
    assert [alpha(t) for t in (0, 14_999, 15_000, 22_499, 22_500, 29_999)] == \
        pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_scale_keeps_the_comments_and_layout_of_params_yaml(tmp_path, paper):
    """Every comment line of the shipped params.yaml is still there after the merge, and the
    merged values are the overlay's."""
    merged = (tmp_path / "params.yaml").read_text()
    comments = [line.strip() for line in (ROOT / "params.yaml").read_text().splitlines() if line.strip().startswith("#")]
    assert comments and all(c in merged for c in comments)
    assert "  samplers: [random, tpe, random-step, tpe-step]" in merged  # flow style kept
    assert paper.model.depth == 40 and paper.final.seeds == [1, 2, 3, 4, 5]


def test_scale_keeps_other_values_and_rejects_a_bad_overlay(tmp_path, paper):
    assert paper.tracking.experiment == load_params(ROOT / "params.yaml").tracking.experiment
    (tmp_path / "scales" / "broken.yaml").write_text("baseline: {momentum: 1.5}\n")
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(ConfigError, match="baseline.momentum"):
        scale.apply("broken", tmp_path / "params.yaml", tmp_path)
    with pytest.raises(ConfigError, match="available: broken, paper"):
        scale.apply("huge", tmp_path / "params.yaml", tmp_path)
    assert (tmp_path / "params.yaml").read_text() == before


QUALITY_METHODS = ("exact", "float", "drmad", "truncated_S", "ift_10", "greedy")


def write(path: Path, content) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, pd.DataFrame):
        content.to_csv(path, index=False)
    else:
        path.write_text(json.dumps(content))


def test_report_rows_for_every_run_and_the_quality_table(tmp_path):
    write(tmp_path / "metrics/baseline.json", {"final_test_error": 0.1, "mean_last_n_test_error": 0.12, "last_n": 5,
                                               "best_val_error": 0.09, "wall_time_s": 10.0, "outcome": "finished"})
    write(tmp_path / "plots/baseline/errors.csv", pd.DataFrame({"epoch": [1, 2], "val_error": [0.2, 0.15],
                                                                "test_error": [0.3, 0.1]}))
    write(tmp_path / "metrics/drmad/-4.0.json", {"final_test_error": 0.08, "final_val_error": 0.07,
                                                 "best_val_error": 0.07, "meta_iterations_completed": 2,
                                                 "reverse_over_forward_time": 3.0, "outcome": "finished",
                                                 "work_gradient_equivalents": 900.0, "hypergradient_work_share": 0.7})
    write(tmp_path / "plots/drmad/-4.0/meta.csv", pd.DataFrame({"test_error": [0.2, 0.08], "seconds": [5.0, 6.0]}))
    write(tmp_path / "plots/drmad/-4.0/epochs.csv", pd.DataFrame({"meta_iteration": [0, 1, 1], "epoch": [1, 1, 2],
                                                                  "test_error": [0.2, 0.1, 0.08]}))
    write(tmp_path / "metrics/adaptive/k100.json", {"final_test_error": 0.05, "mean_last_n_test_error": 0.06,
                                                    "last_n": 3, "best_val_error": 0.04, "final_val_test_gap": -0.01,
                                                    "wall_time_s": 20.0, "hypergradient_time_share": 0.25,
                                                    "outcome": "diverged"})
    for protocol, steps in (("standardised", 200), ("thesis", 2000), ("thesis", 200)):
        write(tmp_path / f"metrics/quality/{protocol}-{steps}.json", {
            "run": f"{protocol}-{steps}", "forward_steps": steps, "protocol": protocol, "outcome": "finished",
            "wall_time_s": 3.0, "meta_iterations_completed": 2, "meta_iterations": 10, "data": "mnist5k 300/100/100",
            "reverse_steps": [50, 60], "reverse_steps_text": [50, 60], "reverse_steps_scripts": [45, 54],
            "exact/norm": [2.0, 3.0], "methods": list(QUALITY_METHODS),
            **{f"{m}/{k}": [0.5, None] for m in QUALITY_METHODS[1:] for k in ("cos_exact", "sign_cos_exact",
                                                                               "norm_ratio")},
            **{f"{m}/hvps": [steps, steps] for m in QUALITY_METHODS}, **{f"{m}/work": [10.0, 20.0] for m in QUALITY_METHODS}})
    write(tmp_path / "plots/quality/thesis-200/hypergrads.csv", pd.DataFrame(
        {"meta_iteration": [0, 0, 1, 1], "method": ["exact", "greedy"] * 2, "cos_exact": [None, 0.3, None, 0.5],
         "work": [400.0, 202.0, 400.0, 202.0]}))  # T = 200: 200 and 2 beyond it
    paths = Outputs(tmp_path).report()
    summary = report.run(tmp_path, last_n=2, paths=paths).set_index("run")
    assert list(summary.index) == ["baseline", "drmad -4.0", "adaptive k100"]
    assert summary.loc["baseline", "val_test_gap"] == pytest.approx(0.05)
    assert summary.loc["drmad -4.0", "mean_last_n_test_error"] == pytest.approx(0.14)
    assert summary.loc["drmad -4.0", "hypergradient_work_share"] == 0.7  # counted, not timed
    assert summary.loc["drmad -4.0", "work_gradient_equivalents"] == 900.0
    assert summary.loc["drmad -4.0", "wall_time_s"] == pytest.approx(11.0)
    assert summary.loc["adaptive k100", "outcome"] == "diverged"
    text = paths.summary_md.read_text()
    assert "| drmad -4.0 | 8.00% | 14.00% |" in text and "| 200 | thesis | drmad | 0.500 / n/a |" in text
    assert "| 200 | thesis | exact |  |  |  | 2 / 3 | 200 / 200 | 15 | finished |" in text
    assert "| thesis-2000 | thesis | 2000 | 2 of 10 | mnist5k 300/100/100 | 50 / 60 | 45 / 54 | finished |" in text
    assert pd.read_csv(paths.summary_csv).shape == (3, len(report.COLUMNS))
    table = pd.read_csv(paths.quality_csv)
    assert len(table) == 3 * len(QUALITY_METHODS) and set(table["work"]) == {15}
    order = table[["forward_steps", "protocol"]].drop_duplicates().values.tolist()
    assert order == [[200, "thesis"], [200, "standardised"], [2000, "thesis"]]  # protocols side by side per T
    # the frontier from the one run with a hypergradient table; no layers.csv here
    assert sorted(p.name for p in paths.figures.iterdir()) == ["hypergradient_frontier.png", "test_error_per_epoch.png"]
