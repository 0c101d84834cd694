"""DVC stage `report`: one table and figures comparing every run, plus the quality study."""
import click

from pipeline.experiments import report
from pipeline.config import load_params
from pipeline.tracking import stage_run
from stages.common import params_option, user_errors_exit_2


@click.command(help="Read metrics/*.json and plots/ of every stage and write reports/summary.md, "
                    "reports/summary.csv (one row per run: final and mean-of-last-N test error, best validation "
                    "error, validation-test gap, wall time, hypergradient cost share), reports/quality.csv and "
                    "reports/figures/*.png; all are also attached to the pipeline's parent MLflow run.")
@params_option
@user_errors_exit_2
def main(params_file: str) -> None:
    params = load_params(params_file)
    with stage_run("report", params) as run:
        summary = report.run(last_n=params.report.last_n, tracker=run, batchnorm=params.evaluation.batchnorm)
    click.echo(report.markdown(summary[["run", "final_test_error", "mean_last_n_test_error"]],
                               percent=("final_test_error", "mean_last_n_test_error")))


if __name__ == "__main__":
    main()
