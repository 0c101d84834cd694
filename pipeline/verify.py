"""`pipeline verify STAGE`: rerun one stage in a scratch copy and compare its metrics with the
ones in the workspace (the committed results, after a clone).

What may be promised: bit-identical on one machine and software stack (constraints.txt); on
another machine CPU kernels can differ in the last bits, and results then agree only within seed
noise. So the comparison says which: `identical`, `within seed noise`, or `beyond seed noise`.
Every key but timings and the platform is compared. On the platform the committed metrics name,
any difference is beyond (bit-identity is the promise there). On another platform, errors and
losses may differ by at most twice the seed-to-seed standard deviation of the baseline's
finalists (reports/verdict_seeds.csv); outcomes, counts, work and every other value must agree
exactly. The committed metrics, params.yaml and the inputs are read once, at the start: a rerun
or an edit in the workspace meanwhile changes nothing this comparison reads.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline.config import ConfigError
from pipeline.layout import timings_of

UNTIMED = ("time", "seconds", "wall", "per_s", "platform")  # keys that describe the machine, not the result
NOISY = ("error", "loss")  # values that may move within seed noise on another platform
NOISE_MULTIPLE = 2.0


@dataclass(frozen=True)
class Comparison:
    verdict: str  # identical | within seed noise | beyond seed noise | differs
    differences: dict[str, tuple[object, object]]
    noise: float | None  # the seed-to-seed standard deviation of the baseline's test error


def flat_numbers(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flat_numbers(value, f"{prefix}{key}.").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in flat_numbers(value, f"{prefix}{i}.").items()}
    return {prefix.rstrip("."): node}


def seed_noise(root: Path) -> float | None:
    """Standard deviation over seeds of the baseline finalists' test error, if the verdict ran."""
    path = root / "reports/verdict_seeds.csv"
    if not path.is_file():
        return None
    errors = pd.read_csv(path).query("method == 'baseline'")["test_error"].dropna()
    return float(errors.std(ddof=1)) if len(errors) >= 2 else None


def compare(committed: dict, rerun: dict, noise: float | None, same_platform: bool = False) -> Comparison:
    old, new = flat_numbers(committed), flat_numbers(rerun)
    differences = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
                   if not any(word in k for word in UNTIMED) and old.get(k) != new.get(k)}
    if not differences:
        return Comparison("identical", {}, noise)
    if same_platform:
        return Comparison("beyond seed noise", differences, noise)
    if noise is None:
        return Comparison("differs", differences, None)
    within = all(any(word in k for word in NOISY) and _number(a) and _number(b) and abs(a - b) <= NOISE_MULTIPLE * noise
                 for k, (a, b) in differences.items())
    return Comparison("within seed noise" if within else "beyond seed noise", differences, noise)


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def stage_spec(root: Path, name: str) -> tuple[str, list[str], list[str]]:
    """The stage's command, dependency paths and metrics files, as DVC resolves them."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        stage = Repo(str(root)).stage.collect(name)[0]
    except (DvcException, IndexError) as exc:
        raise ConfigError(f"pipeline verify: no stage {name!r} in dvc.yaml ({type(exc).__name__})") from None
    metrics = [str(o.def_path) for o in stage.outs if o.metric]
    if not metrics:
        raise ConfigError(f"pipeline verify: stage {name!r} declares no metrics to compare")
    return stage.cmd, [str(d.def_path) for d in stage.deps], metrics


def rerun(root: Path, name: str) -> dict[str, Comparison]:
    """Run stage `name` in a scratch copy of its inputs; compare each metrics file."""
    cmd, deps, metrics = stage_spec(root, name)
    committed = {m: _read_metrics(root / m, name) for m in metrics}  # snapshots, before anything runs
    platforms = {m: _platform(root / m) for m in metrics}
    noise = seed_noise(root)
    with tempfile.TemporaryDirectory(prefix="verify-") as scratch:
        work = Path(scratch)
        for path in {*deps, "pipeline", "stages", "params.yaml", "dvc.yaml"}:
            source = root / path
            if source.is_dir():
                shutil.copytree(source, work / path, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
            elif source.is_file():
                (work / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, work / path)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'verify.db'}", "PYTHONPATH": str(work)}
        env.pop("DVC_ROOT", None)
        done = subprocess.run(cmd, shell=True, cwd=work, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ConfigError(f"pipeline verify: `{cmd}` failed in the scratch copy: {tail}")
        out = {}
        for m in metrics:
            fresh = _read_metrics(work / m, name)
            here = _platform(work / m)
            out[m] = compare(committed[m], fresh, noise, same_platform=here is not None and here == platforms[m])
        return out


def _platform(metrics: Path) -> str | None:
    """The platform that produced a metrics file, from its timings (`io.write_metrics`)."""
    timings = timings_of(metrics)
    return json.loads(timings.read_text()).get("platform") if timings.is_file() else None


def _read_metrics(path: Path, stage: str) -> dict:
    """A metrics file as a mapping, or one line naming it and the stage that writes it."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"pipeline verify: {path} missing; run the stage (dvc repro {stage}) first") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"pipeline verify: {path} is not valid JSON ({exc}); rerun `dvc repro {stage}`") from None
    if not isinstance(value, dict):
        raise ConfigError(f"pipeline verify: {path} holds no metrics mapping; rerun `dvc repro {stage}`")
    return value


def describe(results: dict[str, Comparison]) -> list[str]:
    lines = []
    for path, c in results.items():
        scale = f" (seed noise: sd {100 * c.noise:.2f} points of test error)" if c.noise is not None else ""
        lines.append(f"{path}: {c.verdict}{scale}")
        for key, (old, new) in list(c.differences.items())[:12]:
            gap = f", diff {new - old:+.3g}" if isinstance(old, (int, float)) and isinstance(new, (int, float)) \
                and not isinstance(old, bool) and math.isfinite(old) and math.isfinite(new) else ""
            lines.append(f"  {key}: committed {old}, rerun {new}{gap}")
        if c.verdict == "differs":
            lines.append("  (no seed spread to judge by: run the final stages, which write reports/verdict_seeds.csv)")
    lines.append("Bit-identity holds on one machine and software stack (constraints.txt); across machines "
                 "results agree within seed noise.")
    return lines


def main_exit_code(results: dict[str, Comparison]) -> int:
    return 0 if all(c.verdict in ("identical", "within seed noise") for c in results.values()) else 1

