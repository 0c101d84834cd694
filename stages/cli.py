"""`pipeline` console script: every stage as a subcommand, plus `run` for the whole pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import click

from pipeline.config import load_params
from stages import adaptive, baseline, drmad, paths, prepare, quality
from stages.common import params_option, user_errors_exit_2


@click.group(help="Gradient-based hyperparameter optimisation pipeline. Stages read params.yaml "
                  "and record each execution as an MLflow run; `run` executes the DVC pipeline.")
def main() -> None:
    pass


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              help="`dvc repro` (extra arguments pass through) with every stage run grouped under one "
                   "MLflow parent run.")
@click.pass_context
def run(ctx: click.Context) -> None:
    env = {**os.environ, "PIPELINE_RUN_ID": os.environ.get("PIPELINE_RUN_ID", uuid.uuid4().hex)}
    sys.exit(subprocess.call(["dvc", "repro", *ctx.args], env=env))


@main.command(help="Check params.yaml and print the first problem as one line (exit code 2).")
@params_option
@user_errors_exit_2
def validate(params_file: str) -> None:
    load_params(params_file)
    click.echo(f"{params_file}: ok")


main.add_command(prepare.main, "prepare")
main.add_command(baseline.main, "baseline")
main.add_command(drmad.main, "drmad")
main.add_command(adaptive.main, "adaptive")
main.add_command(quality.main, "quality")
main.add_command(paths.main, "paths")

if __name__ == "__main__":
    main()
