"""DVC stage `arena`: the MLP arena of the verdict, one seed."""
import click

from pipeline.config import ConfigError, load_params
from stages.common import params_option, user_errors_exit_2


@click.command(help="The verdict's MLP arena at one seed: DrMAD, DrMAD2, the exact hypergradient, random search, "
                    "TPE and Hyperband each tune the thesis' MNIST MLP (quality protocol `arena.protocol`) at one "
                    "counted budget (`arena.budget` gradient evaluations) with the seed's own streams, then "
                    "their choice and the hand-set baseline train again from the seed's final initialisation and "
                    "are tested. Writes results/arena/SEED.json (the report's verdict reads it).")
@params_option
@click.option("--seed", "seed", required=True, type=int, help="One of `arena.seeds`, e.g. --seed=3.")
@user_errors_exit_2
def main(params_file: str, seed: int) -> None:
    params = load_params(params_file)
    if seed not in params.arena.seeds:
        raise ConfigError(f"--seed: one of arena.seeds {params.arena.seeds} (got {seed})")
    from pipeline.experiments import arena
    from pipeline.tracking import stage_run
    with stage_run("arena", params, variant=str(seed)) as run:
        out = arena.run(params, seed, tracker=run)
    errors = ", ".join(f"{m} {e['test_error']:.4f}" if e["test_error"] is not None else f"{m} diverged"
                       for m, e in out["methods"].items())
    click.echo(f"arena seed {seed}: test error {errors}")


if __name__ == "__main__":
    main()
