"""The quality stage with its exact half in the stage's process and in a second one, alternately
in one session: per run the stage command's own wall time, and the metrics the stage records
(meta-iterations' wall time, CPU seconds of both processes, the op floor it times after itself).
Each run is the real stage (`python -m stages.quality`) in a scratch folder with its own MLflow
database, so the second process starts as it does under `dvc repro`: before the stage's imports.
Writes JSON.

    python bench/quality_schedule.py --run thesis-200 --run thesis-2000 --repeats 2 \
        --out bench/results/quality_schedule.json
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("wall_time_s", "cpu_time_s", "floor_time_s", "wall_over_floor", "cpu_over_floor", "processes", "platform")


def stage(name: str, mode: str, params_file: Path, scratch: Path) -> dict:
    """One run of the stage with PIPELINE_EXACT_PROCESS=mode; its metrics and its process's wall time."""
    work = scratch / f"{name}-{mode}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(params_file, work / "params.yaml")
    env = {**os.environ, "PIPELINE_EXACT_PROCESS": mode, "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.quality", "--run", name], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    metrics = json.loads((work / f"metrics/quality_{name}.json").read_text())
    return {"stage_wall_s": round(seconds, 1), **{k: metrics[k] for k in KEYS}}


@click.command(help=__doc__)
@click.option("--run", "runs", multiple=True, default=["thesis-200"], show_default=True,
              help="Keys of quality.runs in the params file.")
@click.option("--repeats", default=1, show_default=True, help="Rounds of (one process, two processes) per run.")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="bench/results/quality_schedule.json", show_default=True)
def main(runs: tuple[str, ...], repeats: int, params_file: str, out: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in runs:
            for round_ in range(repeats):
                for mode in ("0", "1"):  # one process, then two
                    rows.append({"run": name, "round": round_, **stage(name, mode, Path(params_file), Path(scratch))})
                    click.echo(json.dumps({k: v for k, v in rows[-1].items() if k != "platform"}))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
