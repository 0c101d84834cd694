"""DVC stage `baseline`: seeded DenseNet training with the fixed hyperparameters of `baseline`."""
from pathlib import Path

import click

from pipeline.config import load_params
from pipeline.layout import Outputs
from stages.common import data_parallel_stage, params_option, say, user_errors_exit_2


@click.command(help="Train the DenseNet of `model` on PREPARED with the `baseline` settings; write "
                    "models/baseline.pt, metrics/baseline.json and plots/baseline/errors.csv. "
                    "Resumes from checkpoints/baseline.pt after an interruption.")
@params_option
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, prepared: str) -> None:
    params = load_params(params_file)
    data_parallel_stage(params, "stages.baseline")
    from pipeline.experiments import baseline
    from pipeline.tracking import stage_run
    with stage_run("baseline", params) as run:  # run() tags the dataset it loads
        metrics = baseline.run(params, Path(prepared), Outputs().baseline(), tracker=run)
    say(f"baseline {metrics['outcome']}: test error {metrics['final_test_error']}, "
        f"mean of last {metrics['last_n']} {metrics['mean_last_n_test_error']}")


if __name__ == "__main__":
    main()
