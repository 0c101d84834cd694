"""DVC reruns a stage only for what it declares: every `params.<section>.<key>` a stage's code
reads (its entry point and its experiment module) must be among its declared params, or a change
to that key would leave the stage's outputs stale without DVC noticing."""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
METHODS = {"model_dump", "model_copy"}  # pydantic methods, not keys
# Read, but changing none of a stage's outputs: where workers meet and how often they beat, and the
# foreach list itself (each item is its own stage instance).
NOT_RESULTS = {"search.storage", "search.heartbeat_s", "search.samplers", "device", "arena.seeds"}


def reads(path: Path) -> set[str]:
    """Every `params.a.b...` chain in a module, cut at pydantic methods."""
    out, tree = set(), ast.parse(path.read_text())
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}  # part of a longer chain
    for node in ast.walk(tree):
        if id(node) in inner:
            continue
        parts, n = [], node
        while isinstance(n, ast.Attribute):
            parts.append(n.attr)
            n = n.value
        if parts and isinstance(n, ast.Name) and n.id == "params" and isinstance(node, ast.Attribute):
            keys = list(reversed(parts))
            out.add(".".join(keys[: keys.index(m)] if (m := next((k for k in keys if k in METHODS), None)) else keys))
    return {r for r in out if r}


def declared(stage: dict, settings: dict) -> set[str]:
    """The stage's params over all its foreach instances (`${key}`, `${item.x}` substituted)."""
    body = stage.get("do", stage)
    each = stage.get("foreach")
    if isinstance(each, str):  # ${a.b}: a mapping or list in params.yaml
        node = settings
        for part in each.strip("${}").split("."):
            node = node[part]
        each = node
    items = ({str(k): v for k, v in each.items()} if isinstance(each, dict) else {str(v): v for v in each}) if each else {"": None}
    out = set()
    for key, item in items.items():
        for entry in body.get("params", []):
            name = entry if isinstance(entry, str) else next(iter(entry))
            name = name.replace("${key}", key)
            for field in re.findall(r"\$\{item\.(\w+)\}", name):
                name = name.replace(f"${{item.{field}}}", str(item[field]))
            out.add(name.replace("${item}", key))
    return out


def covered(read: str, names: set[str]) -> bool:
    return "params.yaml" in names or any(read == d or read.startswith(d + ".") or d.startswith(read + ".") for d in names)


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", [n for n, s in STAGES.items() if re.search(r"-m stages\.(\w+)", s.get("do", s)["cmd"])])
def test_every_param_a_stage_reads_is_declared(name):
    stage = STAGES[name]
    module = re.search(r"-m stages\.(\w+)", stage.get("do", stage)["cmd"]).group(1)
    code = [p for p in (ROOT / f"stages/{module}.py", ROOT / f"pipeline/experiments/{module}.py") if p.is_file()]
    used = set().union(*(reads(p) for p in code))
    names = declared(stage, yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert not sorted(u for u in used if u not in NOT_RESULTS and not covered(u, names)), f"{name} reads undeclared params"


def test_the_check_sees_a_read_of_another_section(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f(params):\n    return params.report.last_n + params.seed + len(params.drmad.model_dump())\n")
    assert reads(module) == {"report.last_n", "seed", "drmad"}
    assert not covered("report.last_n", {"drmad", "seed"}) and covered("drmad.inits", {"drmad"})


def module_file(name: str) -> Path | None:
    for path in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported(path: Path) -> set[str]:
    """The project modules (and the names under them) a file imports, anywhere in it."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("pipeline", "stages")}


def code_closure(module: str) -> set[str]:
    """Repository files `python -m module` imports, transitively (empty __init__.py files aside)."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        path = module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]  # its packages
        todo += imported(path)
    return {p.relative_to(ROOT).as_posix() for p in seen if p.read_text().strip()}


def code_deps(stage: dict) -> set[str]:
    deps = stage.get("do", stage).get("deps", [])
    return {d for d in deps if isinstance(d, str) and d.endswith(".py")}


@pytest.mark.parametrize("name", list(STAGES))
def test_code_deps_are_exactly_what_the_stage_imports(name):
    """An edit to any module a stage imports must make `dvc status` report that stage, and no
    module it never imports may (the files are listed one by one: a folder would cover both)."""
    stage = STAGES[name]
    module = re.search(r"python -m ([\w.]+)", stage.get("do", stage)["cmd"]).group(1)
    assert code_deps(stage) == code_closure(module)
    assert not [d for d in stage.get("do", stage).get("deps", []) if d.rstrip("/") in ("pipeline", "stages")
                or re.fullmatch(r"(pipeline|stages)(/\w+)*", d.rstrip("/")) and (ROOT / d).is_dir()]


def test_every_shared_quality_setting_is_declared_by_the_quality_stage():
    """The stage reads its section through an alias (cfg = params.quality), which `reads` cannot
    follow: every shared key (all but the runs and protocols, declared per instance) is listed."""
    from pipeline.config import QualityConfig
    names = declared(STAGES["quality"], yaml.safe_load((ROOT / "params.yaml").read_text()))
    shared = set(QualityConfig.model_fields) - {"variants", "protocols"}
    assert not sorted(k for k in shared if f"quality.{k}" not in names)
