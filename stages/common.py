"""What every stage shares: user errors become one line on stderr and exit code 2.

Stages import torch, mlflow and the experiments inside their command, after params.yaml has
been read: `--help` and a rejected params.yaml answer in a fraction of a second."""
from __future__ import annotations

import functools
import sys
from typing import Callable

import click

from pipeline.config import Params
from pipeline.errors import USER_ERRORS  # faults the user can fix: one line on stderr, exit code 2

params_option = click.option("--params", "params_file", default="params.yaml", show_default=True,
                             type=click.Path(dir_okay=False), help="Settings file to read.")


def user_errors_exit_2(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if (tracking := sys.modules.get("pipeline.tracking")) is not None:
                tracking.drop_library_logs()  # MLflow's traceback of the same fault
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
    return wrapper


def data_parallel_stage(params: Params, module: str) -> None:
    """Rerun this stage (`python -m module`) under torchrun when params ask for several processes."""
    from pipeline import data_parallel
    data_parallel.relaunch(params.processes, module)


def say(text: str) -> None:
    """The stage's closing line, once (from rank 0 under torchrun)."""
    from pipeline import data_parallel
    if data_parallel.is_main():
        click.echo(text)
