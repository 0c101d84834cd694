"""DVC stage `paths`: the quality MLP's parameter path (thesis figs 2.1-2.2)."""
import click

from pipeline.config import load_params
from stages.common import params_option, user_errors_exit_2


@click.command(help="Train the quality stage's MLP for `paths.steps` steps, keep every `paths.every`-th iterate "
                    "and draw the path on two random coordinates, single coordinates against the iteration, and "
                    "the top-2 principal components. Writes metrics/paths.json, plots/paths/*.csv and "
                    "figures/paths/*.png.")
@params_option
@user_errors_exit_2
def main(params_file: str) -> None:
    params = load_params(params_file)
    from pipeline.experiments import paths as experiment
    from pipeline.tracking import stage_run
    with stage_run("paths", params) as run:
        metrics = experiment.run(params, tracker=run)
    click.echo(f"paths: straightness {metrics['straightness']}, top-2 PCA share {metrics['pca_explained_top2']}")


if __name__ == "__main__":
    main()
