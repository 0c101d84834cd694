"""DVC stage `drmad`: meta-iterations tuning per-parameter log10 L2 with DrMAD, one initialisation."""
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.layout import Outputs
from stages.common import data_parallel_stage, params_option, say, user_errors_exit_2


@click.command(help="Run `drmad.meta_iterations` meta-iterations from the initial log10 L2 INIT (one of "
                    "`drmad.inits`): train DenseNet, DrMAD hypergradient, sign step. Writes "
                    "results/drmad/INIT/hypers.pt, metrics/drmad/INIT.json and plots/drmad/INIT/*.csv; "
                    "resumes after an interruption; a NaN ends the run as outcome `diverged` (exit 0).")
@params_option
@click.option("--init", "init", required=True, help="Initial log10 L2 as written in drmad.inits, e.g. --init=-4.0 "
              "(it also names the output folders).")
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, init: str, prepared: str) -> None:
    params = load_params(params_file)
    data_parallel_stage(params, "stages.drmad")
    from pipeline.experiments import drmad as experiment
    from pipeline.tracking import stage_run
    value = experiment.parse_init(init, params.drmad)
    with stage_run("drmad", params, variant=init) as run:  # run() tags the dataset it loads
        metrics = experiment.run(params, Path(prepared), value, Outputs().drmad(init), tracker=run)
    say(f"drmad {init} {metrics['outcome']}: test error {metrics['final_test_error']} after "
        f"{metrics['meta_iterations_completed']} meta-iterations")


if __name__ == "__main__":
    main()
