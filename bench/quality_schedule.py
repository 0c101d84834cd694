"""The quality stage under several settings, alternately in one session: its exact half in the
stage's process or a second one (PIPELINE_EXACT_PROCESS), each PIPELINE_COMPILE setting, and
optionally an empty inductor cache per run (what a fresh machine's first compile costs). Per run:
the stage command's own wall time, and the metrics the stage records (meta-iterations' wall
time, CPU seconds of both processes, the op floor it times after itself). Each run is the real
stage (`python -m stages.quality`) in a scratch folder with its own MLflow database, so the
second process starts as it does under `dvc repro`: before the stage's imports. Writes JSON.

\b
    python bench/quality_schedule.py --variant thesis-200 --variant thesis-2000 --repeats 2
    python bench/quality_schedule.py --variant thesis-2000 --process 1 --compile auto --compile 0 --cold-cache
"""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

from pipeline import inputs
from pipeline.layout import Outputs

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("wall_time_s", "cpu_time_s", "floor_time_s", "wall_over_floor", "cpu_over_floor", "processes", "platform")


def stage(name: str, settings: dict, params_file: Path, scratch: Path) -> dict:
    """One run of the stage with the environment `settings`; its metrics and its process's wall time."""
    work = scratch / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copy(params_file, work / "params.yaml")
    env = {**os.environ, **settings, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.quality", "--variant", name], cwd=work, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    metrics = inputs.read_metrics(Outputs(work).quality(name).metrics)
    return {"stage_wall_s": round(seconds, 1), **{k: metrics[k] for k in KEYS}}


@click.command(help=__doc__)
@click.option("--variant", "runs", multiple=True, default=["thesis-200"], show_default=True,
              help="Keys of quality.variants in the params file.")
@click.option("--repeats", default=1, show_default=True, help="Rounds over the settings per run.")
@click.option("--process", "processes", multiple=True, default=["0", "1"], show_default=True,
              help="PIPELINE_EXACT_PROCESS values: 0 one process, 1 the exact half in a second one.")
@click.option("--compile", "compiles", multiple=True, default=["auto"], show_default=True,
              help="PIPELINE_COMPILE values.")
@click.option("--cold-cache", is_flag=True, help="Each run with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR).")
@click.option("--params", "params_file", default="params.yaml", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--out", default="bench/results/quality_schedule.json", show_default=True)
def main(runs: tuple[str, ...], repeats: int, processes: tuple[str, ...], compiles: tuple[str, ...],
         cold_cache: bool, params_file: str, out: str) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, round_, process, compile_ in itertools.product(runs, range(repeats), processes, compiles):
            settings = {"PIPELINE_EXACT_PROCESS": process, "PIPELINE_COMPILE": compile_}
            with tempfile.TemporaryDirectory(dir=scratch) as cache:
                if cold_cache:
                    settings["TORCHINDUCTOR_CACHE_DIR"] = cache
                row = stage(name, settings, Path(params_file), Path(scratch))
            rows.append({"run": name, "round": round_, "process": process, "compile": compile_,
                         "inductor_cache": "empty" if cold_cache else "as found", **row})
            click.echo(json.dumps({k: v for k, v in rows[-1].items() if k != "platform"}))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
