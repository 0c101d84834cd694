"""DVC stage `tune`: a tuned method's tuning rerun once per seed of `final.seeds`."""
from pathlib import Path

import click

from pipeline.config import TUNED_KINDS as KINDS, load_params
from pipeline.layout import Outputs
from stages.common import params_option, say, user_errors_exit_2


@click.command(help="Rerun the tuning of one KIND of method once per seed of `final.seeds`, each seed its own "
                    "run: search (every sampler of `search.samplers`, its sampler stream and trials seeded by that "
                    "seed, at the budget the search stages spent) or drmad (every init of `drmad.inits`, w_0, "
                    "batches and dropout masks of that seed). final@KIND retrains each seed's choice at that seed. "
                    "Writes results/tune/KIND.pt and metrics/tune/KIND.json; an interrupted run keeps its "
                    "finished tunings.")
@params_option
@click.option("--kind", required=True, type=click.Choice(KINDS), help="Which methods to tune.")
@click.option("--prepared", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, kind: str, prepared: str) -> None:
    params = load_params(params_file)
    from pipeline.experiments import tune as experiment
    from pipeline.tracking import stage_run
    with stage_run("tune", params, variant=kind) as run:
        metrics = experiment.run(params, Path(prepared), kind, Outputs().tune(kind), tracker=run)
    for method, by_seed in metrics["methods"].items():
        work = ", ".join(f"{c['tuning_work']:g}" for c in by_seed.values())
        say(f"tune {method}: counted work per seed {work}")


if __name__ == "__main__":
    main()
