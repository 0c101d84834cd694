"""`pipeline compare`: the verdict's key numbers and the changed params of the workspace and of
git revisions or DVC experiments, side by side in one table.

A revision is anything git names (a commit, a branch, a tag) or a DVC experiment's name (its ref
under refs/exps). Its reports/verdict.json and params.yaml are read from git; the workspace's from
disk. Params are shown where they differ between the columns, results as test error in percent
with the difference to the baseline in points.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from pipeline.config import ConfigError

VERDICT, PARAMS = "reports/verdict.json", "params.yaml"


def _git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"git {' '.join(args)}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'failed'}")
    return done.stdout


def resolve(root: Path, name: str) -> str:
    """A revision git knows, else the DVC experiment of that name."""
    if subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=root,
                      capture_output=True).returncode == 0:
        return name
    refs = [r for r in _git(root, "for-each-ref", "--format=%(refname)", "refs/exps").split() if r.rsplit("/", 1)[-1] == name]
    if len(refs) != 1:
        raise ConfigError(f"compare: {name!r} is neither a git revision nor one DVC experiment (`dvc exp list`)")
    return refs[0]


def read(root: Path, rev: str | None) -> tuple[dict, dict]:
    """(verdict, params) of the workspace (rev None) or of a revision; a missing verdict is {}."""
    def text(path: str) -> str | None:
        if rev is None:
            file = root / path
            return file.read_text() if file.is_file() else None
        done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None
    verdict, params = text(VERDICT), text(PARAMS)
    return json.loads(verdict) if verdict else {}, yaml.safe_load(params) if params else {}


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def cell(entry: dict | None) -> str:
    if not entry or entry.get("test_error_mean") is None:
        return "n/a"
    diff = entry.get("diff_mean")
    return f"{100 * entry['test_error_mean']:.2f}" + ("" if diff is None else f" ({100 * diff:+.2f})")


def table(columns: dict[str, tuple[dict, dict]], width: int = 120) -> str:
    """Rows: the params that differ between the columns, then per arena and method the test error
    in % (minus the baseline's, points). Method names are cut so the table fits `width`."""
    names = list(columns)
    params = {name: flatten(p) for name, (_, p) in columns.items()}
    keys = sorted({k for p in params.values() for k in p})
    changed = [k for k in keys if len({json.dumps(p.get(k), sort_keys=True) for p in params.values()}) > 1]
    rows = [(k, [str(params[n].get(k, "-")) for n in names]) for k in changed]
    arenas = sorted({a for verdict, _ in columns.values() for a in verdict})
    for arena in arenas:
        methods = list(dict.fromkeys(m for verdict, _ in columns.values() for m in verdict.get(arena, {})))
        rows += [(f"{arena}/{m}", [cell(columns[n][0].get(arena, {}).get(m)) for n in names]) for m in methods]
    cells = max([len(c) for _, r in rows for c in r] + [len(n) for n in names] + [4])
    label = max(12, min(max([len(k) for k, _ in rows] + [0]), width - (cells + 2) * len(names) - 1))
    line = lambda k, cs: f"{k[:label]:<{label}} " + " ".join(f"{c[:cells]:>{cells + 1}}" for c in cs)
    out = [line("", names), line("-" * label, ["-" * cells] * len(names))]
    out += [line(k, cs) for k, cs in rows]
    return "\n".join(out) + "\n\ntest error % (minus the baseline, points) per arena/method; params where the columns differ"


def compare(root: Path, revisions: list[str]) -> str:
    columns = {"workspace": read(root, None)}
    for name in revisions or ["HEAD"]:
        columns[name] = read(root, resolve(root, name))
    return table(columns)
