"""DVC stage `report`: one table and figures comparing every run, plus the quality study."""
import click

from pipeline.config import load_params
from pipeline.layout import Outputs
from stages.common import params_option, user_errors_exit_2


@click.command(help="Read metrics/, plots/ and results/arena/ of every stage and write reports/summary.md (led by "
                    "the verdict of each arena, DenseNet and MLP: test error per method with confidence intervals, "
                    "paired differences to the baseline, a decision (better, worse, equivalent within "
                    "verdict.margin_points, inconclusive), the probability of beating the baseline, and costs; "
                    "reports/verdict.json for `dvc metrics diff`), "
                    "reports/summary.csv (one row per run: final and mean-of-last-N test error, best validation "
                    "error, validation-test gap, wall time, hypergradient cost share), reports/quality.csv and "
                    "reports/figures/*.png; all are also attached to the pipeline's parent MLflow run.")
@params_option
@user_errors_exit_2
def main(params_file: str) -> None:
    params = load_params(params_file)
    from pipeline import machine
    from pipeline.experiments import report
    from pipeline.training import resolve_device
    from pipeline.tracking import stage_run
    with stage_run("report", params) as run:
        report.run(last_n=params.report.last_n, tracker=run, batchnorm=params.evaluation.batchnorm,
                   level=params.final.confidence, here=machine.describe(resolve_device(params.device)),
                   margin=params.verdict.margin_points / 100)
    click.echo(Outputs().report().summary_md.read_text().split("\n# Tuning runs")[0])


if __name__ == "__main__":
    main()
