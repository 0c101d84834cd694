"""DVC stage `final`: retrain every method's chosen hyperparameters over `final.seeds`."""
from pathlib import Path

import click

from pipeline.config import FINAL_KINDS as KINDS, load_params
from pipeline.layout import Outputs
from stages.common import data_parallel_stage, params_option, say, user_errors_exit_2


@click.command(help="Retrain from scratch, at the baseline's full schedule and once per seed of `final.seeds`, "
                    "the choices of one KIND of method: baseline (hand-set), search (each sampler's best "
                    "trial), drmad (each init's best-validation meta-iteration), adaptive (each variant, tuning "
                    "while it trains). Writes metrics/final/KIND.json and plots/final/KIND.csv; an interrupted "
                    "run keeps its finished seeds.")
@params_option
@click.option("--kind", required=True, type=click.Choice(KINDS), help="Which methods to retrain.")
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, kind: str, prepared: str) -> None:
    params = load_params(params_file)
    data_parallel_stage(params, "stages.final")
    from pipeline.experiments import final as experiment
    from pipeline.tracking import stage_run
    with stage_run("final", params, variant=kind) as run:
        metrics = experiment.run(params, Path(prepared), kind, Outputs().final(kind), tracker=run)
    for method, entry in metrics["methods"].items():
        errors = ", ".join("n/a" if e is None else f"{100 * e:.2f}%" for e in entry["test_error"].values())
        say(f"final {method}: test error per seed {errors}")


if __name__ == "__main__":
    main()
