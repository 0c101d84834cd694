"""docs/fidelity.md states each thesis setting's params.yaml key and its value at both scales:
every row must hold for the shipped params.yaml and for it with scales/paper.yaml merged in."""
import copy
import re
from pathlib import Path

import pytest

from pipeline.config import parse_params, read_yaml
from pipeline.scale import merge

ROOT = Path(__file__).resolve().parents[1]
ABSENT = object()


def rows():
    """(key, default, paper) of every table row that names a key; `—` is a key absent at that scale."""
    out = []
    for line in (ROOT / "docs/fidelity.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"`[\w.-]+`", cells[3]):
            out.append(tuple(c.strip("`") for c in cells[3:6]))
    return out


def lookup(settings: dict, key: str):
    node = settings
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


def expected(cell: str):
    return ABSENT if cell == "—" else read_yaml(cell)


@pytest.fixture(scope="module")
def scales():
    default = read_yaml((ROOT / "params.yaml").read_text())
    paper = merge(copy.deepcopy(default), read_yaml((ROOT / "scales/paper.yaml").read_text()))
    parse_params(paper)  # the table describes valid settings
    return {"default": default, "paper": paper}


def test_the_table_names_enough_settings():
    keys = [key for key, _, _ in rows()]
    assert len(keys) >= 60 and len(set(keys)) == len(keys)
    assert {"quality.protocols.thesis.activation", "drmad.hyper_momentum", "adaptive.lr_max",
            "baseline.schedule.milestones"} <= set(keys)


@pytest.mark.parametrize("key,default,paper", rows())
def test_each_stated_value_is_the_shipped_one(scales, key, default, paper):
    assert lookup(scales["default"], key) == expected(default), f"{key} in params.yaml"
    assert lookup(scales["paper"], key) == expected(paper), f"{key} at the paper scale"
