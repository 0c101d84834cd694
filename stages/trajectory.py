"""DVC stage `trajectory`: the quality MLP's training trajectory (thesis figs 2.1-2.2)."""
import click

from pipeline.config import load_params
from pipeline.layout import Outputs
from stages.common import params_option, user_errors_exit_2


@click.command(help="Train the quality stage's MLP for `trajectory.steps` steps, keep every `trajectory.every`-th iterate "
                    "and draw the path on two random coordinates, single coordinates against the iteration, and "
                    "the top-2 principal components. Writes metrics/trajectory.json, plots/trajectory/*.csv "
                    "and figures/trajectory/*.png.")
@params_option
@user_errors_exit_2
def main(params_file: str) -> None:
    params = load_params(params_file)
    from pipeline.experiments import trajectory as experiment
    from pipeline.tracking import stage_run
    with stage_run("trajectory", params) as run:
        metrics = experiment.run(params, Outputs().trajectory(), tracker=run)
    click.echo(f"trajectory: straightness {metrics['straightness']}, top-2 PCA share {metrics['pca_explained_top2']}")


if __name__ == "__main__":
    main()
