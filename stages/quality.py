"""DVC stage `quality`: exact vs float reversal vs DrMAD vs DrMAD2 hypergradients, one forward length."""
import click

from pipeline import quality
from pipeline.config import ConfigError, load_params
from pipeline.tracking import stage_run
from stages.common import params_option, user_errors_exit_2


@click.command(help="Meta-iterations on the MNIST MLP (w = e^s * z, per-unit log scales s) with STEPS forward "
                    "steps (one of `quality.lengths`): from each trajectory the exact, float-reversal, DrMAD "
                    "(heuristic and fixed S) and DrMAD2 hypergradients, their norms and cosines with exact, "
                    "errors, and the reverse-pass traces (thesis figs 3.1-3.6). Writes metrics/quality_STEPS.json, "
                    "plots/quality/STEPS/*.csv and figures/quality/STEPS/*.png; resumes after an interruption.")
@params_option
@click.option("--steps", "steps", required=True, type=int, help="Forward length T, e.g. --steps=2000.")
@user_errors_exit_2
def main(params_file: str, steps: int) -> None:
    params = load_params(params_file)
    if steps < 1:
        raise ConfigError(f"--steps: a forward length >= 1 (got {steps})")
    with stage_run("quality", params, variant=str(steps)) as run:
        metrics = quality.run(params, steps, quality.QualityPaths.for_length(steps), tracker=run)
    click.echo(f"quality T={steps} {metrics['outcome']}: cos(DrMAD, exact) {metrics['drmad/cos_exact']}, "
               f"norm ratio {metrics['drmad/norm_ratio']}")


if __name__ == "__main__":
    main()
