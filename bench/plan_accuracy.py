"""`pipeline plan` against the committed run: per stage instance, the planned compute seconds on
this machine (its cached calibration) and the seconds the committed metrics recorded, and their
ratio (actual / planned). Writes JSON (default bench/results/plan_accuracy.json).

    python bench/plan_accuracy.py
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline import plan
from pipeline.config import load_params


@click.command(help=__doc__)
@click.option("--out", default="bench/results/plan_accuracy.json", show_default=True, type=click.Path(dir_okay=False))
def main(out: str) -> None:
    planned = plan.make(load_params(), Path("."), everything=True)
    ratios = plan.against_actual(planned, Path("."))
    values = sorted(r["ratio"] for r in ratios.values())
    result = {"device": planned.device.name, "note": "committed metrics may come from another machine or load",
              "median_ratio": values[len(values) // 2] if values else None,
              "within_2x": sum(0.5 <= v <= 2.0 for v in values), "stages": ratios}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
