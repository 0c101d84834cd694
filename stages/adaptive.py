"""DVC stage `adaptive`: online hypergradients tuning per-parameter L2 and learning rates."""
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.layout import Outputs
from stages.common import data_parallel_stage, params_option, say, user_errors_exit_2


@click.command(help="Train DenseNet once with the adaptive method of the configuration VARIANT (a key of "
                    "`adaptive.variants`): every K steps a sign step on per-parameter log10 L2 and log learning "
                    "rates from the hypergradient through the last M steps. Writes results/adaptive/VARIANT/, "
                    "metrics/adaptive/VARIANT.json and plots/adaptive/VARIANT/*.csv; resumes after an "
                    "interruption; a NaN ends the run as outcome `diverged` (exit 0).")
@params_option
@click.option("--variant", required=True, help="Configuration name, e.g. --variant=k100.")
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, variant: str, prepared: str) -> None:
    params = load_params(params_file)
    data_parallel_stage(params, "stages.adaptive")
    from pipeline import data
    from pipeline.experiments import adaptive as experiment
    from pipeline.tracking import stage_run
    experiment.variant(params, variant, data.load_info(Path(prepared)))  # a bad name or size fails before any run is recorded
    with stage_run("adaptive", params, variant=variant) as run:  # run() tags the dataset it loads
        metrics = experiment.run(params, Path(prepared), variant, Outputs().adaptive(variant),
                                   tracker=run)
    say(f"adaptive {variant} {metrics['outcome']}: test error {metrics['final_test_error']}, mean of last "
        f"{metrics['last_n']} {metrics['mean_last_n_test_error']}")


if __name__ == "__main__":
    main()
