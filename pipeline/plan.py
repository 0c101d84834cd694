"""`pipeline plan`: what a run will cost before it starts.

For every stage instance `dvc repro` would run: its counted work (pipeline/work.py, added up by the
stages' own functions: epochs per meta-iteration, steps per epoch, trials per budget, hypergradients
per adaptive run), its wall time (the work at this device's calibrated seconds per step,
pipeline/calibration.py, plus a process start), its peak memory and its disk. Counts the run
decides as it goes are planned at their cap and marked "<=": DrMAD's heuristic S (at
`max_reverse_steps`, or T), and so the meta-iterations and trials that depend on it.
Imported by the CLI only: no stage depends on it.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline import calibration
from pipeline.config import SOURCE_SIZES, ConfigError, Params
from pipeline.work import Work

GiB = 2 ** 30
DENSENET, MLP = "densenet", "mlp"
DATA_PARALLEL = ("baseline", "drmad", "adaptive", "final")  # stages that run on `processes` ranks
# Stage families each family reads from (dvc.yaml's deps, at the level of families; validate first).
AFTER = {"prepare": ("validate",), "baseline": ("prepare",), "drmad": ("prepare",), "adaptive": ("prepare",),
         "search": ("drmad",), "tune@search": ("drmad",), "tune@drmad": ("prepare",), "final@baseline": ("prepare",),
         "final@adaptive": ("prepare",), "final@search": ("tune@search",), "final@drmad": ("tune@drmad",),
         "arena": ("validate",), "quality": ("validate",), "trajectory": ("validate",)}


@dataclass
class Unit:
    """One training and its hypergradients (a meta-iteration, a trial, one seed's finalist)."""
    label: str
    training: int = 0  # training gradient evaluations
    hypergradients: list[int] = field(default_factory=list)  # reverse steps (HVPs) of each
    evaluated: int = 0  # images evaluated (not counted work; timed)
    uncounted: tuple[int, int] = (0, 0)  # (gradients, HVPs) timed but not counted (calibration runs)


@dataclass
class Instance:
    name: str  # drmad@-4.0
    model: str  # densenet | mlp
    units: list[Unit]
    bounded: bool = False  # some count is a cap, not the count
    memory: dict[str, int] = field(default_factory=dict)  # bytes at peak, by part
    disk: int = 0  # bytes written
    seconds: float = 0.0  # compute (what the stage's metrics time)
    startup: float = 0.0
    source: str = "measured"  # measured | extrapolated: why

    @property
    def family(self) -> str:
        return self.name.split("@")[0]

    def work(self, hvp: str) -> Work:
        """Counted as the stages count: pipeline.work.Work, recomputed gradients per HVP method."""
        from pipeline.hypergrad.hvp import recomputed_gradients
        out = Work()
        for u in self.units:
            out.train(u.training)
            for steps in u.hypergradients:
                out.hypergradient(steps, recomputed_gradients(hvp, steps))
        return out

    @property
    def peak(self) -> int:
        return sum(self.memory.values())


# -- counted work, per stage --------------------------------------------------------------------

def sizes(params: Params) -> dict[str, int]:
    d = params.data
    return {"train": d.train_count, "val": d.val_size, "test": d.test_size or SOURCE_SIZES[d.source][1]}


def steps_per_epoch(images: int, batch: int) -> int:
    from pipeline.training import BatchSchedule
    return BatchSchedule(images, batch, 0).steps_per_epoch


def evaluated(params: Params, n: dict[str, int]) -> int:
    """Images one epoch's evaluation reads: precise BatchNorm over the training split, val, test."""
    return (n["train"] if params.evaluation.batchnorm == "precise" else 0) + n["val"] + n["test"]


def training(params: Params, cfg, label: str, n: dict[str, int] | None = None) -> Unit:
    n = n or sizes(params)
    return Unit(label, cfg.epochs * steps_per_epoch(n["train"], cfg.batch_size), evaluated=cfg.epochs * evaluated(params, n))


def line_steps(params: Params) -> tuple[int, bool]:
    """DrMAD's S: the fixed `reverse_steps`, or the heuristic's cap (bounded)."""
    cfg = params.drmad
    return (cfg.reverse_steps, False) if cfg.reverse_steps else (cfg.max_reverse_steps, True)


def drmad_units(params: Params, init: float, prefix: str = "") -> list[Unit]:
    from pipeline.meta import epochs_at
    cfg, n = params.drmad, sizes(params)
    s, _ = line_steps(params)
    units = []
    for i in range(cfg.meta_iterations):
        epochs = epochs_at(i, cfg.start_epochs(init), cfg.epochs_growth, cfg.epochs_cap)
        u = training(params, cfg.train_config(epochs), f"{prefix}meta {i}", n)
        u.hypergradients = [s + (min(cfg.last, u.training) if cfg.method == "drmad2" else 0)]
        u.uncounted = (6, 6) if i == 0 else (0, 0)  # step_costs(sample=3): hvp_cost_measured
        units.append(u)
    return units


def adaptive_units(params: Params, name: str, label: str) -> list[Unit]:
    from pipeline.adaptive import hypergradients_in
    cfg, var, n = params.adaptive, params.adaptive.variants[name], sizes(params)
    if var.val_size is not None:
        n = {**n, "train": n["train"] + n["val"] - var.val_size, "val": var.val_size}
    u = training(params, cfg.train_config(var.momentum), label, n)
    u.hypergradients = [var.window] * hypergradients_in(u.training, var.every, var.window)
    return [u]


def search_budget(params: Params, drmad_work: list[float]) -> float:
    return float(params.search.budget) if params.search.budget != "drmad" else sum(drmad_work) / len(drmad_work)


def search_units(params: Params, budget: float, prefix: str = "") -> list[Unit]:
    from pipeline.experiments.search import trial_cost, trial_config
    cost = trial_cost(params, {"sizes": sizes(params)})
    trial = training(params, trial_config(params, {"log10_l2": params.baseline.log10_l2}), "")
    return [Unit(f"{prefix}trial {k}", trial.training, evaluated=trial.evaluated) for k in range(int(budget // cost))]


def final_units(params: Params, kind: str) -> list[Unit]:
    from pipeline.experiments import final, tune
    seeds = params.final.seeds
    if kind == "adaptive":
        return [u for name in params.adaptive.variants for scheduled in (False, True) for seed in seeds
                for u in adaptive_units(final.adaptive_params(params, seed, scheduled), name,
                                        f"adaptive {name}{' sched' if scheduled else ''} seed {seed}")]
    methods = ["baseline"] if kind == "baseline" else tune.methods(params, kind)
    return [training(params, params.baseline, f"{m} seed {s}") for m in methods for s in seeds]


def mlp_hypergradient(params: Params, method: str, steps: int) -> int:
    """Reverse steps (HVPs) of one MLP hypergradient by `method` (pipeline/hypergrad: exact and
    float reverse T steps, DrMAD its line, DrMAD2 the last K then the line, truncated K, implicit
    terms + 1 (ift.py), greedy 1 (greedy.py)); DrMAD's heuristic S at its cap, at most T."""
    q = params.quality
    s = min(q.max_reverse_steps, steps)
    if method in ("exact", "float"):
        return steps
    if method == "drmad":
        return s
    if method == "drmad_fixed":
        return q.drmad_steps
    if method == "drmad2":
        return min(q.last, steps) + s
    if method.startswith("truncated_"):
        k = method.removeprefix("truncated_")
        return min(s if k == "S" else int(k), steps)
    if method.startswith("ift_"):
        return int(method.removeprefix("ift_")) + 1
    return 1  # greedy


def quality_units(params: Params, name: str) -> list[Unit]:
    from pipeline.experiments.quality import methods
    q = params.quality
    steps = q.variants[name].steps
    hvps = [mlp_hypergradient(params, m, steps) for m in methods(q)]
    timing = min(100, steps) * 2 * 2  # step_costs before and after: 2 passes of up to 100 steps
    units = [Unit(f"meta {i}", 2 * steps, hvps, evaluated=q.data.train_size or 0) for i in range(q.meta_iterations_of(name))]
    units[0].uncounted = (timing, timing)
    return units


def arena_units(params: Params) -> list[Unit]:
    """Every method's tuning at `arena.budget`, then its retraining (pipeline/experiments/arena.py)."""
    from pipeline.experiments import arena, quality
    a, steps = params.arena, params.arena.steps
    units = []
    for method in arena.GRADIENT_METHODS:
        name = {"truncated": f"truncated_{next((k for k in params.quality.truncate if k != 'S'), 100)}"}.get(method, method)
        r = mlp_hypergradient(params, name, steps)
        cost = quality.counted_work(steps, {"hvps": r, "gradients": 1}, params.quality.hvp_cost)
        units += [Unit(f"{method} meta {i}", steps, [r]) for i in range(max(1, int(a.budget // cost)))]
    for method in arena.SEARCH_METHODS:  # trials of T steps while one more fits (hyperband: rungs)
        units.append(Unit(f"{method} trials", int(a.budget // steps) * steps if method != "hyperband" else int(a.budget)))
    return units + [Unit("retraining", steps * len(arena.METHODS))]


def instances(params: Params) -> dict[str, tuple[str, list[Unit], bool]]:
    """Every stage instance of dvc.yaml: name -> (model, units, bounded)."""
    bounded = line_steps(params)[1]
    out: dict[str, tuple[str, list[Unit], bool]] = {"validate": (DENSENET, [], False), "prepare": (DENSENET, [], False),
                                                   "baseline": (DENSENET, [training(params, params.baseline, "training")], False)}
    drmad_work = []
    for init in params.drmad.inits:
        units = drmad_units(params, init)
        out[f"drmad@{init}"] = (DENSENET, units, bounded)
        drmad_work.append(Instance("", DENSENET, units).work(params.hvp).metrics(params.work.hvp_cost)["work_gradient_equivalents"])
    for name in params.adaptive.variants:
        out[f"adaptive@{name}"] = (DENSENET, adaptive_units(params, name, "training"), False)
    budget = search_budget(params, drmad_work)
    for sampler in params.search.samplers:
        out[f"search@{sampler}"] = (DENSENET, search_units(params, budget), bounded and params.search.budget == "drmad")
    out["tune@search"] = (DENSENET, [u for seed in params.final.seeds for s in params.search.samplers
                                     for u in search_units(params, budget, f"seed {seed} {s} ")], out["search@" + params.search.samplers[0]][2])
    out["tune@drmad"] = (DENSENET, [u for seed in params.final.seeds for i in params.drmad.inits
                                    for u in drmad_units(params, i, f"seed {seed} drmad {i:g} ")], bounded)
    for kind in ("baseline", "search", "drmad", "adaptive"):
        out[f"final@{kind}"] = (DENSENET, final_units(params, kind), False)
    for seed in params.arena.seeds:
        out[f"arena@{seed}"] = (MLP, arena_units(params), True)
    for name in params.quality.variants:
        out[f"quality@{name}"] = (MLP, quality_units(params, name), True)
    out["trajectory"] = (MLP, [Unit("training", params.trajectory.steps)], False)
    out["report"] = (DENSENET, [], False)
    return out


# -- memory and disk ----------------------------------------------------------------------------

def exact_buffer_bytes(params: int, steps: int, momentum: float) -> int:
    """Exact reversal's information buffer (hypergrad/bitsback.py): log2(2^16 / n) bits per element
    and step for beta = n / 2^16, in 16-bit words, beside each element's state and top (int64) and
    its seed words."""
    from pipeline.hypergrad.bitsback import D, WORD_BITS, BitsBackBuffer, rational_beta
    bits = math.log2(D / rational_beta(momentum))
    words = math.ceil((BitsBackBuffer.START_BITS + steps * bits) / WORD_BITS)
    return params * (8 + 8 + (WORD_BITS // 8) * words)


def memory(params: Params, name: str, model: str, units: list[Unit], cal: dict) -> dict[str, int]:
    """Peak bytes by part: data, weights with gradients and velocity, per-parameter L2, what the
    method keeps (DrMAD's copies, the adaptive window, exact's buffer), activations."""
    family, p = name.split("@")[0], cal["params"]
    if model == DENSENET:
        n, shape = sizes(params), calibration.SHAPES[params.data.source]
        data, width = sum(n.values()) * math.prod(shape) * 4, 4
    else:
        d = params.quality.data
        n = d.train_count + d.val_size + (d.test_size or SOURCE_SIZES[d.source][1])
        data, width = n * 784 * (4 + 8), 8  # float32 pixels and their float64 copy
    if family in ("validate", "report", "prepare"):  # no training: at most the data
        return {"data": data} if family == "prepare" else {}
    out = {"data": data, "model": 4 * p * width, "activations": cal["activation_bytes"]}
    reversing = any(u.hypergradients for u in units)
    if reversing:
        out["activations"] *= 3  # double backward keeps the graph of the gradient
    if family in ("drmad", "tune") and model == DENSENET:
        out["drmad copies"] = 8 * p * width  # hypers, momentum, w_0, w_T, v_T, and dw, dv, d hypers
    if family in ("adaptive", "final") and params.adaptive.variants:
        window = max(v.window for v in params.adaptive.variants.values())
        out["adaptive window"] = (2 * window + 4) * p * width
    if family in ("quality", "arena"):
        steps = params.quality.variants[name.split("@")[1]].steps if family == "quality" else params.arena.steps
        momentum = max(pr.momentum for pr in params.quality.protocols.values())
        out["exact buffer"] = exact_buffer_bytes(p, steps, momentum) + 16 * p  # and fixed-point w, v
    if family == "trajectory":
        out["iterates"] = (params.trajectory.steps // params.trajectory.every + 1) * p * width
    if family in DATA_PARALLEL and model == DENSENET:
        out = {k: v * params.processes for k, v in out.items()}  # every rank holds its own copy
    return out


FIGURE = 40_000  # bytes of one MLflow figure (a histogram, an error curve)


def disk(params: Params, name: str, units: list[Unit], cal: dict) -> int:
    """Bytes written: outputs, checkpoints (removed at the end, but there at the peak), MLflow figures."""
    family, p = name.split("@")[0], cal["params"]
    if family == "prepare":
        n = sizes(params)
        return sum(n.values()) * (math.prod(calibration.SHAPES[params.data.source]) * 4 + 8)
    per = {"baseline": 3 * 4 * p, "drmad": 5 * 4 * p + FIGURE * len(units), "adaptive": 20 * 4 * p,
           "tune": 5 * 4 * p * len(params.final.seeds) * max(1, len(params.drmad.inits)),
           "final": 3 * 4 * p * len(params.final.seeds), "quality": 2_000_000 + 200 * params.quality.trace_points * len(units),
           "search": 200_000 + 10_000 * len(units), "report": 5_000_000}
    if family == "validate":
        return 100
    return per.get(family, 1_000_000) + FIGURE * 4


# -- time -------------------------------------------------------------------------------------

def seconds(units: list[Unit], cal: dict) -> float:
    """Compute seconds: gradients, reverse steps (a gradient and an HVP, one double backward) and
    evaluated images at the calibrated rates."""
    grads = sum(u.training + len(u.hypergradients) + u.uncounted[0] for u in units)
    hvps = sum(sum(u.hypergradients) + u.uncounted[1] for u in units)
    return grads * cal["grad_s"] + hvps * cal["hvp_s"] + sum(u.evaluated for u in units) * cal["eval_image_s"]


@dataclass
class Device:
    """Where the plan's times come from, and what memory and disk the run has."""
    name: str
    memory: int  # bytes available
    memory_what: str
    cal: calibration.Calibration
    fallback: calibration.Calibration | None = None  # extrapolate from here when `cal` lacks a key
    note: str = ""


def open_device(target: str, root: Path, calibration_file: Path | None = None) -> Device:
    """This machine's device, or (`cuda` without one) a GPU's calibration file from bench/gpu.py."""
    cache = root / calibration.CACHE
    here = torch.device("cuda" if torch.cuda.is_available() and target != "cpu" else "cpu")
    cpu = calibration.Calibration(cache / calibration.CPU_FILE, torch.device("cpu"),
                                  calibration.device_name(torch.device("cpu")))
    if target == "cuda" and here.type != "cuda":
        path = calibration_file or cache / calibration.CUDA_FILE
        if path.is_file():
            entries = json.loads(path.read_text())
            name = next((json.loads(k)["device"] for k in entries), "cuda")
            memory = max((v.get("device_memory", 0) for v in entries.values()), default=0)
            return Device(name, memory, "GPU memory (calibration file)",
                          calibration.Calibration(path, None, name), cpu, f"GPU calibration {path}")
        return Device("cuda (no calibration)", 0, "", cpu, None,
                      f"extrapolated: this CPU's timings, no GPU calibration ({path} missing: run bench/gpu.py on a GPU)")
    if here.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        name = calibration.device_name(here)
        return Device(name, free, "free GPU memory", calibration.Calibration(cache / calibration.CUDA_FILE, here, name), cpu)
    return Device(cpu.name, available_memory(), "available RAM (/proc/meminfo)", cpu)


def available_memory() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def spec(params: Params, model: str) -> dict:
    threads = params.threads if isinstance(params.threads, int) else 1
    if model == DENSENET:
        return calibration.densenet_spec(params.model, params.data.source, params.baseline.batch_size,
                                         params.baseline.eval_batch_size, params.hvp, threads)
    return calibration.mlp_spec(params.quality.protocols[params.arena.protocol], params.quality.dtype, params.hvp, threads)


def calibrated(params: Params, root: Path = Path(".")) -> bool:
    """Whether this device's calibration already holds every model of `params` (planning then
    measures nothing: quick enough for `validate` and `scale` to print the plan's cost)."""
    cal = open_device(params.device, root).cal
    return all(calibration.key(cal.name, spec(params, m)) in cal.entries for m in (DENSENET, MLP))


def rates(device: Device, s: dict) -> tuple[dict, str]:
    """Seconds per step for spec `s` on the device: measured, or extrapolated (and from what)."""
    got = device.cal.get(s)
    if got is not None:
        return got, "measured" if not device.note.startswith("extrapolated") else device.note
    cpu = device.fallback.get(s)  # the shape's size (activations) and parameters, measured here
    same = [(json.loads(k), v) for k, v in device.cal.entries.items() if json.loads(k).get("model") == s["model"]]
    if not same:
        return cpu, f"extrapolated: this CPU's timings ({device.note} has no {s['model']})"
    ref_spec, ref = min(same, key=lambda kv: abs(math.log(kv[1]["activation_bytes"] / cpu["activation_bytes"])))
    scale = cpu["activation_bytes"] / ref["activation_bytes"]
    out = {**cpu, **{k: ref[k] * scale for k in ("grad_s", "hvp_s", "eval_image_s")}}
    return out, (f"extrapolated from {ref_spec['model']} depth {ref_spec.get('depth', '-')} batch {ref_spec['batch']} "
                 f"on {device.name} by activation size (x{scale:.3g})")


# -- the plan -----------------------------------------------------------------------------------

@dataclass
class Plan:
    params: Params
    device: Device
    instances: list[Instance]
    stale_note: str
    free_disk: int

    def total(self) -> float:
        return sum(i.seconds + i.startup for i in self.instances)

    def finish_times(self, jobs: int | None = None) -> dict[str, float]:
        """When each instance ends: after the families it reads from (AFTER), on `jobs` workers
        (None: as many as can run at once, the critical path)."""
        end: dict[str, float] = {}
        free = [0.0] * (jobs or len(self.instances) or 1)
        for inst in self.instances:  # dvc.yaml order is topological
            if inst.family == "report":
                before = tuple(end)
            else:
                before = AFTER.get(inst.name, AFTER.get(inst.family, ()))
            ready = max((t for n, t in end.items() if n.split("@")[0] in before or n in before), default=0.0)
            k = min(range(len(free)), key=free.__getitem__)
            start = max(ready, free[k])
            end[inst.name] = free[k] = start + inst.seconds + inst.startup
        return end

    def critical_path(self, jobs: int | None = None) -> float:
        return max(self.finish_times(jobs).values(), default=0.0)

    def problems(self) -> list[str]:
        """One line per limit a stage exceeds: memory, then disk."""
        out = []
        for inst in self.instances:
            if self.device.memory and inst.peak > self.device.memory:
                out.append(f"plan: {inst.name} needs {size(inst.peak)} of memory at its peak "
                           f"({', '.join(f'{k} {size(v)}' for k, v in inst.memory.items())}); "
                           f"{self.device.name} has {size(self.device.memory)} {self.device.memory_what}")
        written = sum(i.disk for i in self.instances)
        if self.free_disk and written > self.free_disk:
            big = max(self.instances, key=lambda i: i.disk)
            out.append(f"plan: the run writes {size(written)} ({big.name} the most, {size(big.disk)}); "
                       f"the disk has {size(self.free_disk)} free")
        return out

    def rows(self) -> list[dict]:
        return [{"stage": i.name, **{k: v for k, v in i.work(self.params.hvp).metrics(self.params.work.hvp_cost
                                                                               if i.model == DENSENET else self.params.quality.hvp_cost).items()},
                 "reverse_steps": sum(sum(u.hypergradients) for u in i.units), "bounded": i.bounded,
                 "compute_s": round(i.seconds, 2), "startup_s": round(i.startup, 2), "memory_bytes": i.memory,
                 "disk_bytes": i.disk, "timing": i.source,
                 "units": [{"label": u.label, "training_gradients": u.training, "hypergradients": len(u.hypergradients),
                            "reverse_steps": sum(u.hypergradients)} for u in i.units]}
                for i in self.instances]

    def table(self, jobs: int | None = None) -> str:
        """One table, 120 columns at most."""
        head = f"{'stage':<28} {'train grads':>11} {'HVPs':>10} {'work (grad-eq)':>15} {'time':>9} {'peak mem':>9} {'disk':>9}  timing"
        lines = [head, "-" * len(head)]
        extrapolated = set()
        for inst, row in zip(self.instances, self.rows()):
            le = "<=" if inst.bounded else ""
            if inst.source != "measured":
                extrapolated.add(inst.source)
            hv = ("<=" if inst.bounded and row["work_hvps"] else "") + format(row["work_hvps"], ",")
            lines.append(f"{inst.name[:28]:<28} {row['work_training_gradients']:>11,} {hv:>10} "
                         f"{le + format(round(row['work_gradient_equivalents']), ','):>15} {duration(inst.seconds + inst.startup):>9} "
                         f"{size(inst.peak):>9} {size(inst.disk):>9}  {'measured' if inst.source == 'measured' else 'extrapolated'}")
        lines.append("-" * len(head))
        lines.append(f"{len(self.instances)} stage instance(s) on {self.device.name[:60]}: {duration(self.total())} one after "
                     f"another (dvc repro); critical path {duration(self.critical_path())}"
                     + (f", {duration(self.critical_path(jobs))} on {jobs} workers" if jobs else "")
                     + f"; peak {size(max((i.peak for i in self.instances), default=0))} of "
                     f"{size(self.device.memory) if self.device.memory else '?'}; disk {size(sum(i.disk for i in self.instances))} "
                     f"of {size(self.free_disk)} free")
        lines.append(self.stale_note)
        lines += sorted(f"timing: {e}" for e in extrapolated)
        if any(i.bounded for i in self.instances):
            lines.append("<=: DrMAD's reverse steps S planned at their cap (the heuristic's S is known only once the run trains)")
        return "\n".join(wrap(line) for line in lines)


def wrap(line: str, width: int = 120) -> str:
    out = []
    while len(line) > width:
        cut = line.rfind(" ", 0, width)
        cut = cut if cut > 0 else width
        out.append(line[:cut])
        line = "  " + line[cut:].lstrip()
    return "\n".join([*out, line])


def duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 86400 * 2 else f"{s / 86400:.1f} d"


def size(b: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2 ** 20), ("KiB", 1024)):
        if b >= scale:
            return f"{b / scale:.1f} {unit}"
    return f"{int(b)} B"


def stale(root: Path) -> set[str] | None:
    """What `dvc status` says has changed (None: no DVC answer, e.g. outside a DVC repository)."""
    try:
        proc = subprocess.run(["dvc", "status", "--json"], cwd=root, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    lines = proc.stdout.strip().splitlines()
    return set(json.loads(lines[-1] or "{}")) if lines else set()


def make(params: Params, root: Path = Path("."), *, everything: bool = False, target: str | None = None,
         calibration_file: Path | None = None, note: str | None = None) -> Plan:
    """The plan of `params` on this device (or `target`): the stale instances, or all of them."""
    device = open_device(target or params.device, root, calibration_file)
    chosen = instances(params)
    if everything:
        stale_note = note or "all stage instances (--all)"
    else:
        changed = stale(root)
        if changed is None:
            stale_note, everything = "dvc status gave no answer: every stage instance planned", True
        else:
            chosen = {k: v for k, v in chosen.items() if k in changed}
            stale_note = f"{len(chosen)} stale instance(s) of {len(instances(params))} (dvc status; --all plans every one)"
    cals = {m: rates(device, spec(params, m)) for m in {m for m, _, _ in chosen.values()}}
    startup = device.cal.startup() if device.cal.device is not None else device.fallback.startup()
    out = []
    for name, (model, units, bounded) in chosen.items():
        cal, source = cals[model]
        inst = Instance(name, model, units, bounded, source=source, startup=startup or 0.0)
        inst.seconds = seconds(units, cal)
        if inst.family in DATA_PARALLEL and model == DENSENET:
            inst.seconds /= params.processes  # each rank trains b / N images of every step
        if inst.family == "quality" and not os.environ.get("PIPELINE_WORKERS"):
            inst.seconds /= 1.6  # its exact half runs in a second process (bench/quality_schedule.py: 106 s / 62 s)
        inst.memory, inst.disk = memory(params, name, model, units, cal), disk(params, name, units, cal)
        out.append(inst)
    return Plan(params, device, out, stale_note, shutil.disk_usage(root).free)


def check(plan: Plan) -> None:
    """Raise the first limit the plan exceeds as one line (ConfigError: exit code 2)."""
    if problems := plan.problems():
        raise ConfigError(problems[0])


# -- plan against actual ------------------------------------------------------------------------

def actual_seconds(name: str, root: Path = Path(".")) -> float | None:
    """An instance's compute seconds as its own outputs record them (start-up excluded; timings/)."""
    from pipeline import inputs
    from pipeline.layout import Outputs
    o, family, _, key = Outputs(root), *name.partition("@")
    try:
        if family == "arena":
            m = inputs.read_metrics(o.arena(key))["methods"].values()
            return sum(e["tuning_wall_s"] + e["final_wall_s"] for e in m)
        path = {"baseline": o.baseline().metrics, "trajectory": o.trajectory().metrics}.get(family) or \
            getattr(o, family)(key).metrics
        m = inputs.read_metrics(Path(path))
    except (ConfigError, OSError, ValueError, KeyError, AttributeError, TypeError):
        return None
    if family == "drmad":
        return (m["seconds_per_meta_iteration"] or 0.0) * m["meta_iterations_completed"]
    if family == "search":
        return m["attempt_wall_time_s"]
    if family == "tune":
        return sum(c["tuning_wall_s"] for by_seed in m["methods"].values() for c in by_seed.values())
    if family == "final":
        return sum(sum(v for v in e["wall_time_s"].values() if v) for e in m["methods"].values())
    return m.get("wall_time_s")


def against_actual(plan: Plan, root: Path = Path("."), ran: set[str] | None = None) -> dict[str, dict]:
    """Per planned instance that ran (all with outputs, when `ran` is None): planned and measured
    compute seconds and their ratio (actual / planned)."""
    out = {}
    for inst in plan.instances:
        if ran is not None and inst.name not in ran:
            continue
        got = actual_seconds(inst.name, root)
        if got is None or inst.seconds <= 0:
            continue
        out[inst.name] = {"planned_s": round(inst.seconds, 3), "actual_s": round(got, 3),
                          "ratio": round(got / inst.seconds, 3)}
    return out
