"""DVC stage `prepare`: seeded splits and normalisation of the DenseNet stages' dataset."""
from pathlib import Path

import click

from pipeline.config import load_params
from stages.common import params_option, user_errors_exit_2


@click.command(help="Load `data.source`, split it with `data.seed` into train/val/test, normalise "
                    "with training-split statistics and write tensor files to OUT.")
@params_option
@click.option("--out", default="data/prepared", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def main(params_file: str, out: str) -> None:
    params = load_params(params_file)
    from pipeline import data
    from pipeline.tracking import stage_run
    with stage_run("prepare", params) as run:
        info = data.prepare(params.data, Path(out))
        run.set_tag("dataset.digest", info["digest"])
        run.log_metrics({f"size/{s}": info["sizes"][s] for s in ("train", "val", "test")})
        run.log_artifact(Path(out) / "info.json")
    click.echo(f"prepared {info['source']}: " + ", ".join(f"{k} {v}" for k, v in info["sizes"].items()))


if __name__ == "__main__":
    main()
