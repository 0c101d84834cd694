"""Outputs are named once (pipeline/layout.py): what dvc.yaml tracks for each stage instance is
what the stage writes through `Outputs`, and a reader's error names the stage that writes the file."""
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from pipeline.inputs import writer_of
from pipeline.layout import SINGLE_INSTANCE, Outputs, timings_of

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SCRATCH = ("checkpoint", "work_dir", "storage_dir")  # resumable state: never a DVC output


def instances(stage: dict) -> dict[str, object]:
    each = stage.get("foreach")
    if each is None:
        return {"": None}
    if isinstance(each, str):
        node = PARAMS
        for part in each.strip("${}").split("."):
            node = node[part]
        each = node
    return {str(k): v for k, v in each.items()} if isinstance(each, dict) else {str(v): v for v in each}


def declared(stage: dict, key: str) -> set[str]:
    body = stage.get("do", stage)
    outs = [next(iter(o)) if isinstance(o, dict) else o for section in ("outs", "metrics") for o in body.get(section, [])]
    return {o.replace("${key}", key).replace("${item}", key) for o in outs}


def written(name: str, key: str) -> set[str]:
    """The files the stage writes through Outputs (resumable state aside), its results' timings
    beside them (`io.write_metrics`)."""
    out = Outputs()
    if name == "arena":
        return {out.arena(key).as_posix(), timings_of(out.arena(key)).as_posix()}
    if name == "trajectory":
        made = out.trajectory()
    elif name in ("baseline", "report"):
        made = getattr(out, name)()
    else:
        made = getattr(out, name)(key)
    results = made.verdict_json if name == "report" else made.metrics
    return {getattr(made, f.name).as_posix() for f in dataclasses.fields(made)
            if f.name not in SCRATCH and getattr(made, f.name) is not None} | {timings_of(results).as_posix()}


@pytest.mark.parametrize("name", [n for n in DVC if n not in ("validate", "prepare")])
def test_dvc_tracks_what_each_stage_writes(name):
    for key in instances(DVC[name]):
        tracked, files = declared(DVC[name], key), written(name, key)
        covered = lambda f: any(f == t or f.startswith(t.rstrip("/") + "/") for t in tracked)
        assert [f for f in files if not covered(f)] == [], f"{name}@{key}: written but not tracked"
        assert [t for t in tracked if not any(f == t or f.startswith(t + "/") for f in files)] == [], \
            f"{name}@{key}: tracked but not written through Outputs"


def test_one_rule_names_every_output_and_its_writer():
    out = Outputs(Path("some/root"))
    for path, stage in ((out.drmad("-4.0").meta_csv, "drmad@-4.0"), (out.adaptive("k100").metrics, "adaptive@k100"),
                        (out.quality("thesis-200").hypergrads_csv, "quality@thesis-200"), (out.tune("drmad").choices, "tune@drmad"),
                        (out.search("tpe").best, "search@tpe"), (out.final("search").epochs_csv, "final@search"),
                        (out.arena(3), "arena@3"), (out.baseline().per_epoch, "baseline"),
                        (out.trajectory().coordinates_csv, "trajectory")):
        assert writer_of(path) == stage
        assert re.match(r"some/root/(metrics|plots|results|figures|models)/" + stage.split("@")[0], path.as_posix())
    assert set(SINGLE_INSTANCE) >= {"baseline", "trajectory"}


def test_instances_are_what_wrote_metrics(tmp_path):
    for tag in ("-4.0", "-7.0"):
        Outputs(tmp_path).drmad(tag).metrics.parent.mkdir(parents=True, exist_ok=True)
        Outputs(tmp_path).drmad(tag).metrics.write_text("{}")
    assert Outputs(tmp_path).instances("drmad") == ["-4.0", "-7.0"] and Outputs(tmp_path).instances("quality") == []
