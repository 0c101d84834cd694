"""DVC stage `quality`: exact vs float reversal vs DrMAD vs DrMAD2 hypergradients, one run."""
import click

from pipeline.config import ConfigError, load_params
from pipeline.layout import Outputs
from stages.common import params_option, user_errors_exit_2


@click.command(help="Meta-iterations on the MNIST MLP (w = e^s * z, per-unit log scales s) for variant NAME of "
                    "`quality.variants` (a protocol of `quality.protocols` at a forward length T): from each "
                    "trajectory the exact, float-reversal, DrMAD (heuristic and fixed S) and DrMAD2 "
                    "hypergradients, their norms and cosines with exact, errors, and the reverse-pass traces "
                    "(thesis figs 3.1-3.6). Writes metrics/quality/NAME.json, plots/quality/NAME/*.csv and "
                    "figures/quality/NAME/*.png; resumes after an interruption.")
@params_option
@click.option("--variant", "name", required=True, help="A key of `quality.variants`, e.g. --variant=thesis-2000.")
@user_errors_exit_2
def main(params_file: str, name: str) -> None:
    params = load_params(params_file)
    if name not in params.quality.variants:
        raise ConfigError(f"--variant: one of {', '.join(params.quality.variants)} (got {name!r})")
    from pipeline.hypergrad import exact_process
    with exact_process.for_params(params.device, params.threads, params.hvp) as exact_worker:  # starts before the imports
        from pipeline.experiments import quality
        from pipeline.tracking import stage_run
        with stage_run("quality", params, variant=name) as run:
            metrics = quality.run(params, name, Outputs().quality(name), tracker=run, exact_worker=exact_worker)
    click.echo(f"quality {name} {metrics['outcome']}: cos(DrMAD, exact) {metrics['drmad/cos_exact']}, "
               f"norm ratio {metrics['drmad/norm_ratio']}")


if __name__ == "__main__":
    main()
