"""DVC stage `search`: a peer of the gradient-based methods, random search or TPE (Optuna)."""
from pathlib import Path

import click

from pipeline.config import ConfigError, load_params
from pipeline.layout import Outputs
from stages.common import params_option, user_errors_exit_2


@click.command(help="Search the baseline's global log10 L2 (DrMAD's space; NAME random or tpe) or the L2 and "
                    "the step size (NAME random-step or tpe-step) with that Optuna sampler (`search.samplers`) until the budget (`search.budget`, gradient evaluations; "
                    "`drmad`: what a drmad@INIT run spent) is spent. Each trial is a nested MLflow run. "
                    "Writes results/search/NAME/best.json, metrics/search/NAME.json and plots/search/NAME/"
                    "trials.csv. A killed search resumes with its finished trials kept (Optuna RDB storage).")
@params_option
@click.option("--sampler", "name", required=True, help="random, tpe, random-step or tpe-step (listed in search.samplers).")
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@click.option("--worker", is_flag=True, help="Only run trials of the shared study (search.storage), write no "
              "outputs: start any number beside the DVC stage, on this machine or others.")
@user_errors_exit_2
def main(params_file: str, name: str, prepared: str, worker: bool) -> None:
    params = load_params(params_file)
    if name not in params.search.samplers:
        raise ConfigError(f"--sampler: one of {', '.join(params.search.samplers)} (got {name!r})")
    from pipeline.experiments import search as experiment
    from pipeline.tracking import stage_run
    variant = f"{name} worker {experiment.WORKER}" if worker else name
    with stage_run("search", params, variant=variant) as run:
        metrics = experiment.run(params, Path(prepared), name, Outputs().search(name), tracker=run,
                                 worker_only=worker)
    if metrics is None:
        click.echo(f"search {name}: worker {experiment.WORKER} done")
        return
    click.echo(f"search {name}: {metrics['trials']} trials, {metrics['work_gradient_equivalents']:g} of "
               f"{metrics['budget_gradient_equivalents']:g} gradient evaluations; best val error "
               f"{metrics['best_val_error']:.4f} (trial {metrics['best_trial']})")


if __name__ == "__main__":
    main()
