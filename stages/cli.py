"""`pipeline` console script: every stage as a subcommand, plus `run` for the whole pipeline."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import click

from pipeline.config import ConfigError, load_params
from stages import adaptive, baseline, drmad, prepare, quality, report, trajectory
from stages.common import params_option, user_errors_exit_2


@click.group(help="Gradient-based hyperparameter optimisation pipeline. Stages read params.yaml "
                  "and record each execution as an MLflow run; `run` executes the DVC pipeline.")
@click.version_option(package_name="gbhpo", message="%(package)s %(version)s")
def main() -> None:
    pass


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              help="`dvc repro` (extra arguments pass through) with every stage run grouped under one "
                   "MLflow parent run. First prints the plan of what will run (`pipeline plan`) and stops, one "
                   "line and exit code 2, when a stage's memory or the run's disk exceeds this machine's; after "
                   "the run, each stage's planned compute time against its measured one goes to "
                   "reports/plan_vs_actual.json and the parent run (no stage depends on either), and the stages "
                   "DVC found current are recorded there from their committed outputs (tag restored=true), with "
                   "the verdict and the report.")
@click.option("--no-plan", is_flag=True, help="Skip the plan: run `dvc repro` at once.")
@click.pass_context
def run(ctx: click.Context, no_plan: bool) -> None:
    env = {**os.environ, "PIPELINE_RUN_ID": os.environ.get("PIPELINE_RUN_ID", uuid.uuid4().hex)}
    planned = None if no_plan else _plan_before_run(ctx.args)
    code = subprocess.call(["dvc", "repro", *ctx.args], env=env)
    if code == 0:
        if planned is not None:
            _plan_after_run(planned, env)
        from pipeline.mlflow_record import after_repro
        code = after_repro(env["PIPELINE_RUN_ID"], ctx.args)
    sys.exit(code)


@user_errors_exit_2
def _plan_before_run(args: list[str]):
    from pipeline import plan as plan_module
    params = load_params()
    planned = plan_module.make(params, Path("."), everything="-f" in args or "--force" in args)
    click.echo(planned.table())
    plan_module.check(planned)
    return planned


def _plan_after_run(planned, env: dict) -> None:
    """Planned against measured compute seconds of what ran: a plain file and the parent run."""
    from pipeline import plan as plan_module
    from pipeline.io import write_json
    still = plan_module.stale(Path("."))
    ratios = plan_module.against_actual(planned, Path("."), {i.name for i in planned.instances} - (still or set()))
    if not ratios:
        return
    write_json(Path("reports/plan_vs_actual.json"), {"device": planned.device.name, "stages": ratios})
    click.echo("plan vs actual (compute seconds, actual / planned): "
               + ", ".join(f"{k} {v['ratio']:.2f}" for k, v in ratios.items()))
    try:
        os.environ["PIPELINE_RUN_ID"] = env["PIPELINE_RUN_ID"]
        from pipeline import tracking
        with tracking.stage_run("plan", planned.params) as tracked:
            tracked.log_parent_metrics({f"plan_ratio/{k.replace('@', ':')}": v["ratio"] for k, v in ratios.items()})  # MLflow keys take no @
            tracked.log_parent_artifact("reports/plan_vs_actual.json")
    except Exception as exc:  # the run's result stands; the record is a convenience
        click.echo(f"warning: plan vs actual not logged to MLflow: {type(exc).__name__}: {exc}", err=True)


@main.command(short_help="What a run will cost: work, time, memory and disk per stage.",
              help="The plan of a run before it starts: every stage instance `dvc repro` would run (stale per "
                   "`dvc status`; --all: every one), its counted work (training gradients, HVPs, gradient "
                   "equivalents, as the stages count them), its wall time from a short calibration of each model "
                   "on this device (cached in .cache/plan/), its peak memory and its disk; then the total one "
                   "after another, the critical path when independent stages run at once, and with --jobs N on N "
                   "workers. `<=` marks counts planned at their cap (DrMAD's heuristic reverse steps). A stage "
                   "whose memory, or a run whose disk, exceeds this machine's is one line and exit code 2. "
                   "--scale NAME plans scales/NAME.yaml merged in, without changing params.yaml; --device cuda on a "
                   "machine without one uses a GPU calibration file (bench/gpu.py writes .cache/plan/cuda.json) "
                   "or extrapolates from this CPU and says so.")
@params_option
@click.option("--all", "everything", is_flag=True, help="Plan every stage instance, not only the stale ones.")
@click.option("--scale", "scale_name", default=None, help="Plan scales/NAME.yaml merged into the params (implies --all).")
@click.option("--device", "target", type=click.Choice(["auto", "cpu", "cuda"]), default=None,
              help="Device to plan for (default: params' device).")
@click.option("--calibration", "calibration_file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="GPU calibration file for --device cuda (default .cache/plan/cuda.json).")
@click.option("--jobs", type=click.IntRange(1), default=None, help="Also the time on N parallel workers.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the plan, per stage and per meta-iteration, seed or trial, as JSON.")
@user_errors_exit_2
def plan(params_file: str, everything: bool, scale_name: str | None, target: str | None,
         calibration_file: str | None, jobs: int | None, json_file: str | None) -> None:
    from pipeline import plan as plan_module
    params, note = load_params(params_file), None
    if scale_name:
        from pipeline import scale as scale_module
        params, everything = scale_module.preview(scale_name, Path(params_file)), True
        note = f"scale {scale_name} (scales/{scale_name}.yaml merged in memory; {params_file} unchanged): every stage instance"
    planned = plan_module.make(params, Path("."), everything=everything, target=target,
                               calibration_file=Path(calibration_file) if calibration_file else None, note=note)
    click.echo(planned.table(jobs))
    if json_file:
        from pipeline.io import write_json
        write_json(Path(json_file), {"device": planned.device.name, "total_s": planned.total(),
                                     "critical_path_s": planned.critical_path(), "stages": planned.rows()})
    plan_module.check(planned)


@main.command(help="Check params.yaml (every key, type and range, and what this machine can run: the device) "
                   "and print the first problem as one line (exit code 2). With --stamp FILE, also write "
                   "FILE (constant content): the pipeline's first DVC stage, so that a rejected params.yaml "
                   "stops `dvc repro` before any stage's outputs are removed.")
@params_option
@click.option("--stamp", type=click.Path(dir_okay=False), default=None, help="File to write when valid.")
@user_errors_exit_2
def validate(params_file: str, stamp: str | None) -> None:
    params = load_params(params_file)
    from pipeline.io import write_text
    from pipeline.training import resolve_device
    from pipeline.scale import needs
    device = resolve_device(params.device)
    if stamp:
        write_text(stamp, "params.yaml validated\n")  # constant: never a reason to rerun what depends on it
    click.echo(f"{params_file}: ok")
    for line in needs(params, device.type == "cuda"):
        click.echo(f"  needs: {line}")
    if not stamp:  # the DVC stage stays quick: the plan calibrates
        _needs_plan(params)


@main.command(short_help="Merge scales/NAME.yaml (paper: the thesis' settings) into params.yaml.",
              help="Merge scales/NAME.yaml into params.yaml (`pipeline scale paper`: CIFAR-10, DenseNet-40, "
                   "300 epochs, the thesis' DrMAD/adaptive/quality settings). Validated first; `git checkout "
                   "params.yaml` returns to the embedded default.")
@click.argument("name")
@params_option
@user_errors_exit_2
def scale(name: str, params_file: str) -> None:
    from pipeline import scale as scale_module
    scale_module.apply(name, Path(params_file))
    click.echo(f"{params_file}: scale {name} applied; `dvc params diff` shows the changes")
    import torch
    params = load_params(params_file)
    for line in scale_module.needs(params, torch.cuda.is_available()):
        click.echo(f"  needs: {line}")
    _needs_plan(params)


def _needs_plan(params) -> None:
    """The planned cost of every stage, in one line (`pipeline plan --all` for the table), when this
    device's calibration is cached (measuring DenseNet-40 on a CPU takes minutes)."""
    from pipeline import plan as plan_module
    if not plan_module.calibrated(params):
        click.echo("  needs: its cost: `pipeline plan --all` (times each model on this device first, once)")
        return
    planned = plan_module.make(params, Path("."), everything=True)
    big = max(planned.instances, key=lambda i: i.peak)
    click.echo(f"  needs: {plan_module.duration(planned.total())} one stage after another on {planned.device.name[:40]} "
               f"({plan_module.duration(planned.critical_path())} critical path), {plan_module.size(big.peak)} memory "
               f"at most ({big.name}), {plan_module.size(sum(i.disk for i in planned.instances))} disk: `pipeline plan --all`")
    for line in planned.problems():
        click.echo(f"  needs: {line}")


@main.command(help="The verdict's test errors (%, and minus the baseline in points) per arena and method, with "
                   "the params that differ, for the workspace and each REVISION: a git revision or a DVC "
                   "experiment's name (default: HEAD). One table, 120 columns wide.")
@click.argument("revisions", nargs=-1)
@user_errors_exit_2
def compare(revisions: tuple[str, ...]) -> None:
    from pipeline.compare import compare as side_by_side
    click.echo(side_by_side(Path("."), list(revisions)))


@main.command(short_help="Rerun a stage in a scratch copy; compare with the workspace's results.",
              help="Rerun STAGE (baseline, drmad@-4.0, ...) in a scratch copy of its inputs and compare its "
                   "metrics with the workspace's (the committed results): identical, within seed noise (errors "
                   "within twice the baseline finalists' seed-to-seed standard deviation), or beyond it. Exit code "
                   "1 when beyond, 2 when the comparison could not be made. Bit-identity is promised on one machine "
                   "and software stack only: there every result must match exactly.")
@click.argument("stage")
def verify(stage: str) -> None:
    from pipeline import verify as verify_module
    try:
        results = verify_module.rerun(Path("."), stage)
    except Exception as exc:  # any failure is exit 2, never 1 (that says "beyond seed noise")
        click.echo(f"error: {exc}" if isinstance(exc, ConfigError) else f"error: pipeline verify: {type(exc).__name__}: {exc}",
                   err=True)
        sys.exit(2)
    click.echo("\n".join(verify_module.describe(results)))
    sys.exit(verify_module.main_exit_code(results))


@main.group(help="A tracking service for a team or a cluster: PostgreSQL (MLflow's runs and shared Optuna "
                 "studies) and `mlflow server` with an artifact directory, on loopback by default.")
def service() -> None:
    pass


@service.command("start", help="Start PostgreSQL and mlflow server under DIR (default .tracking); prints the "
                               "MLFLOW_TRACKING_URI for stages and the Optuna URL for search.storage.")
@click.option("--dir", "root", default=".tracking", show_default=True, type=click.Path(file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address mlflow server binds to.")
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--db-port", default=5433, show_default=True, type=int, help="PostgreSQL's port (loopback only).")
@click.option("--artifacts", default=None, help="Artifact destination (default DIR/artifacts; e.g. s3://bucket/path).")
@user_errors_exit_2
def service_start(root: str, host: str, port: int, db_port: int, artifacts: str | None) -> None:
    from pipeline import service as service_module
    try:
        started = service_module.start(Path(root), host, port, db_port, artifacts)
    except KeyboardInterrupt:  # SIGINT or SIGTERM: start has stopped what it started
        click.echo("error: pipeline service: start interrupted; nothing left running", err=True)
        sys.exit(130)
    click.echo(f"export MLFLOW_TRACKING_URI={started.tracking_uri}\n"
               f"# search.storage for shared Optuna studies (its password is in {root}/password, mode 0600):\n"
               f"# {started.database_url('optuna')}")


@service.command("stop", help="Stop the service started under DIR.")
@click.option("--dir", "root", default=".tracking", show_default=True, type=click.Path(file_okay=False))
@user_errors_exit_2
def service_stop(root: str) -> None:
    from pipeline import service as service_module
    service_module.stop(Path(root))
    click.echo(f"stopped the service in {root}")


main.add_command(prepare.main, "prepare")
main.add_command(baseline.main, "baseline")
main.add_command(drmad.main, "drmad")
main.add_command(adaptive.main, "adaptive")
main.add_command(quality.main, "quality")
main.add_command(trajectory.main, "trajectory")
main.add_command(report.main, "report")

if __name__ == "__main__":
    main()
