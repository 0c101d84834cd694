"""params.yaml -> typed, validated settings.

Every problem is reported as one line that names the key path and what is allowed, e.g.
``params.yaml: baseline.epochs: must be >= 1 (got -3)``; stages turn it into exit code 2
before writing anything.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PARAMS_FILE = "params.yaml"

# Images available per source: (train pool, own test split or 0 when the source has none).
SOURCE_SIZES = {"digits": (1797, 0), "mnist5k": (5000, 0), "cifar10": (50000, 10000), "mnist": (60000, 10000)}


FINAL_KINDS = ("baseline", "search", "drmad", "adaptive")  # the kinds of method the verdict retrains
TUNED_KINDS = ("search", "drmad")  # the kinds tune@KIND reruns per seed before final@KIND retrains


def check_names(named: dict, where: str) -> None:
    """Names that become stage instances and file names: letters, digits, '_', '.', '-' (no '/')."""
    for name in named:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)) or str(name) in (".", ".."):
            raise ValueError(f"{where}: {str(name)!r} is not a name: use letters, digits, '_', '.' and '-' "
                             "(it becomes a stage instance and file names)")


class ConfigError(ValueError):
    """A bad params.yaml: the message is one line naming the key and what is allowed."""


SEED_MAX = 2 ** 63 - 1  # torch.manual_seed and derived seeds take 64-bit values


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    source: Literal["digits", "mnist5k", "cifar10", "mnist"] = "digits"
    root: str = "data/raw"  # torchvision sources: folder holding the dataset
    download: bool = False  # torchvision sources: fetch when missing (never in tests)
    train_size: Optional[int] = Field(default=None, ge=1)  # None: all that is left
    val_size: int = Field(default=300, ge=1)
    test_size: Optional[int] = Field(default=None, ge=1)  # None: the whole own test split
    seed: int = Field(default=0, ge=0, le=SEED_MAX)

    @model_validator(mode="after")
    def _fits(self):
        pool, own_test = SOURCE_SIZES[self.source]
        if own_test == 0 and self.test_size is None:
            raise ValueError(f"test_size: {self.source} has no test split of its own, give a size")
        if own_test and self.test_size and self.test_size > own_test:
            raise ValueError(f"test_size: at most {own_test} for {self.source} (got {self.test_size})")
        held = self.val_size + (self.test_size if own_test == 0 else 0)
        need = held + (self.train_size or 1)
        if need > pool:
            raise ValueError(
                f"val_size: train+val{'' if own_test else '+test'} must fit in the {pool} images "
                f"of {self.source} (asked for {need})")
        return self

    @property
    def train_count(self) -> int:
        """Images in the training split once the others are cut from the pool."""
        pool, own_test = SOURCE_SIZES[self.source]
        return self.train_size or pool - self.val_size - (0 if own_test else self.test_size)


class ModelConfig(Section):
    depth: int = Field(default=10, ge=7)
    growth_rate: int = Field(default=12, ge=1)
    init_maps: int = Field(default=16, ge=1)
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _depth(self):
        if (self.depth - 4) % 3:
            raise ValueError(f"depth: must be 3*n + 4 (3 dense blocks of n layers), got {self.depth}")
        return self


class ScheduleConfig(Section):
    """Step schedule: alpha is multiplied by `factor` at each fraction of the epochs."""
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    factor: float = Field(default=0.1, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _sorted(self):
        m = self.milestones
        if any(not 0 < x < 1 for x in m) or m != sorted(m):
            raise ValueError(f"milestones: increasing fractions in (0, 1), got {m}")
        return self


class TrainConfig(Section):
    epochs: int = Field(default=10, ge=1)
    batch_size: int = Field(default=64, ge=1)
    alpha: float = Field(default=1.0, gt=0.0)  # w += alpha * v; alpha*(1-momentum) is PyTorch's lr
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    nesterov: bool = True
    schedule: ScheduleConfig = ScheduleConfig()
    log10_l2: float = Field(default=-4.0, ge=-30.0, le=3.0)  # R = sum 10^l2 * w^2 (2x torch weight_decay)
    weight_clip: Optional[float] = Field(default=None, gt=0.0)
    eval_batch_size: int = Field(default=500, ge=1)
    last_n: int = Field(default=5, ge=1)  # report the mean test error of the last n epochs


class DrmadConfig(Section):
    """Meta-iterations tuning per-parameter log10 L2 with DrMAD hypergradients (algorithms §5-6)."""
    inits: list[float] = Field(default_factory=lambda: [-4.0, -2.0, -7.0])  # one stage instance each
    sharing: Literal["parameter", "unit", "layer", "global"] = "parameter"
    bounds: list[float] = Field(default_factory=lambda: [-12.0, 0.0], min_length=2, max_length=2)
    meta_iterations: int = Field(default=3, ge=1)
    epochs_start: int = Field(default=1, ge=1)  # epochs of meta-iteration 0, then x growth up to cap
    epochs_growth: float = Field(default=1.4, ge=1.0)
    epochs_cap: int = Field(default=2, ge=1)
    # epochs_start for particular inits (thesis: the bad ones, -2 and -7, start at 10, not 100)
    epochs_start_by_init: dict[float, int] = Field(default_factory=dict)
    batch_size: int = Field(default=64, ge=1)
    alpha: float = Field(default=1.0, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)  # classical: what DrMAD is derived for
    schedule: ScheduleConfig = ScheduleConfig(milestones=[])  # constant alpha for short runs (paper: 0.5, 0.75)
    weight_clip: Optional[float] = Field(default=1000.0, gt=0.0)
    hyper_step: float = Field(default=0.3333, gt=0.0)  # log10 units per meta-iteration (thesis: 1/3)
    hyper_momentum: float = Field(default=0.7, ge=0.0, lt=1.0)
    method: Literal["drmad", "drmad2"] = "drmad"
    reverse_steps: Optional[int] = Field(default=None, ge=1)  # None: S = 1 / (multiplier * gamma)
    multiplier: float = Field(default=1.0, gt=0.0)
    max_reverse_steps: int = Field(default=20, ge=1)  # a cap on the heuristic's S (paper: 10,000)
    step_map: Literal["same", "stride", "nearest"] = "same"
    last: int = Field(default=100, ge=1)  # DrMAD2: float reversal of the last K steps
    eval_batch_size: int = Field(default=500, ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.bounds[0] >= self.bounds[1]:
            raise ValueError(f"bounds: [low, high] with low < high, got {list(self.bounds)}")
        if any(not self.bounds[0] <= i <= self.bounds[1] for i in self.inits):
            raise ValueError(f"inits: every initial log10 L2 must lie within bounds {list(self.bounds)}")
        if self.epochs_cap < max([self.epochs_start, *self.epochs_start_by_init.values()]):
            raise ValueError(f"epochs_cap: must be >= every epochs_start ({self.epochs_start}, "
                             f"{self.epochs_start_by_init})")
        if any(e < 1 for e in self.epochs_start_by_init.values()):
            raise ValueError(f"epochs_start_by_init: epochs >= 1, got {self.epochs_start_by_init}")
        return self

    def start_epochs(self, init: float) -> int:
        return self.epochs_start_by_init.get(init, self.epochs_start)

    def train_config(self, epochs: int) -> TrainConfig:
        return TrainConfig(epochs=epochs, batch_size=self.batch_size, alpha=self.alpha, momentum=self.momentum,
                           nesterov=False, schedule=self.schedule, weight_clip=self.weight_clip,
                           eval_batch_size=self.eval_batch_size)


class AdaptiveVariant(Section):
    """One configuration of the adaptive method (thesis 3.2.2 ran two)."""
    every: int = Field(default=20, ge=1)  # K: steps between hyperparameter updates (paper: 100)
    window: int = Field(default=5, ge=1)  # M: steps the validation loss goes back through
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    l2_step: float = Field(default=0.01, ge=0.0)  # sign step of log10 L2
    lr_step: float = Field(default=0.2, ge=0.0)  # sign step of ln learning rate
    val_size: Optional[int] = Field(default=None, ge=1)  # re-split train+val; None: the prepared split


class AdaptiveConfig(Section):
    """Online hypergradients tuning per-parameter L2 and learning rates (algorithms §7)."""
    variants: dict[str, AdaptiveVariant] = Field(default_factory=lambda: {
        "k100": AdaptiveVariant(), "k131": AdaptiveVariant(every=26, window=4, momentum=0.95, l2_step=0.02,
                                                           lr_step=0.1, val_size=400)})
    epochs: int = Field(default=6, ge=1)
    batch_size: int = Field(default=64, ge=1)
    alpha: float = Field(default=1.0, gt=0.0)  # alpha_t = alpha * schedule * e^eta per parameter
    schedule: ScheduleConfig = ScheduleConfig(milestones=[])
    init_log10_l2: float = -4.0
    init_log_lr: float = Field(default=0.0, ge=-30.0, le=30.0)  # eta_0: alpha_t = alpha * schedule * e^eta
    # The ceiling of each learning rate. thesis: lr = alpha e^eta (1 - momentum) <= lr_max, the thesis'
    # rate (its convention: v <- m v - lr g, w <- w + v; its log lr clipped below 0, i.e. lr_max 1,
    # from 0.1: a rate may rise tenfold); initial: e^eta <= e^init_log_lr, no rate above its start
    lr_ceiling: Literal["thesis", "initial"] = "thesis"
    lr_max: float = Field(default=1.0, gt=0.0)
    lr_floor: bool = False  # keep alpha_t * e^eta >= floor_factor * alpha * floor_schedule_t
    floor_factor: float = Field(default=0.1, gt=0.0, le=1.0)
    floor_schedule: Optional[ScheduleConfig] = None  # the floor's schedule; null: `schedule` itself
    l2_bounds: list[float] = Field(default_factory=lambda: [-12.0, 0.0], min_length=2, max_length=2)
    sharing: Literal["parameter", "unit", "layer", "global", "thesis"] = "thesis"  # of log10 L2
    lr_sharing: Literal["parameter", "unit", "layer", "global", "thesis"] = "thesis"  # of learning rates
    val_batch_size: int = Field(default=100, ge=1)
    # one: a hyper-update's validation loss is one batch of val_batch_size; window: the mean over
    # `window` batches of val_batch_size (the thesis: its last M steps' batches of 64)
    val_batches: Literal["one", "window"] = "one"
    weight_clip: Optional[float] = Field(default=None, gt=0.0)
    eval_batch_size: int = Field(default=500, ge=1)
    last_n: int = Field(default=3, ge=1)

    @model_validator(mode="after")
    def _checks(self):
        if not self.variants:
            raise ValueError("variants: at least one configuration")
        check_names(self.variants, "variants")
        if self.l2_bounds[0] >= self.l2_bounds[1]:
            raise ValueError(f"l2_bounds: [low, high] with low < high, got {self.l2_bounds}")
        if not self.l2_bounds[0] <= self.init_log10_l2 <= self.l2_bounds[1]:
            raise ValueError(f"init_log10_l2: must lie within l2_bounds {self.l2_bounds}")
        for name, var in self.variants.items():
            if self.lr_ceiling == "thesis" and self.eta_max(var.momentum) < self.init_log_lr:
                raise ValueError(f"lr_max: at least the initial rate alpha e^init_log_lr (1 - momentum) of "
                                 f"variant {name} ({self.alpha * math.exp(self.init_log_lr) * (1 - var.momentum):g})")
        return self

    def eta_max(self, momentum: float) -> float:
        """The ceiling of eta (ln of the learning-rate multiplier) at this momentum."""
        if self.lr_ceiling == "initial":
            return self.init_log_lr
        return math.log(self.lr_max / (self.alpha * (1.0 - momentum)))

    def train_config(self, momentum: float) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, alpha=self.alpha, momentum=momentum,
                           nesterov=False, schedule=self.schedule, weight_clip=self.weight_clip,
                           eval_batch_size=self.eval_batch_size, last_n=self.last_n)


class QualityProtocol(Section):
    """How the quality study's MLP trains: one named set of settings (thesis 3.1 is `thesis`;
    docs/fidelity.md lists each setting's source)."""
    hidden: list[int] = Field(default_factory=lambda: [50, 50, 50], min_length=1)  # MLP 784-50-50-50-10
    activation: Literal["tanh", "relu"] = "tanh"  # hidden units (the thesis' scripts: tanh)
    batch_size: int = Field(default=50, ge=1)
    alpha: float = Field(default=0.05, gt=0.0)  # w += alpha * v, v = m v - (1 - m) g (the thesis' form)
    momentum: float = Field(default=0.95, ge=0.5, lt=1.0)  # classical; >= 0.5 for exact reversal
    log_l2: float = Field(default=-4.0, ge=-50.0, le=10.0)  # fixed c = base^log_l2 of c ||z||^2
    l2_base: Literal["e", "10"] = "e"  # the thesis writes the penalty as e^lambda
    init_scale: float = 0.2  # initial ln scale s_0 of every unit (w = e^s z)
    z0_log_scale: Optional[float] = Field(default=-3.0, ge=-20.0, le=5.0)  # z_0 = e^this N(0, 1); null: N(0, 1/fan-in)
    # scaled: b = e^s_b z_b with s_b fixed at init_scale, z_b drawn and penalised like z (the scripts);
    # plain: b starts at 0, unscaled and unpenalised
    biases: Literal["scaled", "plain"] = "scaled"
    # unit: [0, 1]; centred: [0, 1] minus the training split's per-pixel mean (the scripts);
    # standardised: per channel mean and std of the training split
    pixels: Literal["unit", "centred", "standardised"] = "centred"
    multiplier: float = Field(default=10.0, gt=0.0)  # DrMAD heuristic S = 1 / (multiplier * gamma)
    # gamma's weighting over the first 20 steps: text (1/t over t = 1..20, the thesis' words) or
    # scripts (t = 5..19, weights 1/2, 1/4, ..., the first taking the rest; S rounded up)
    heuristic: Literal["text", "scripts"] = "text"

    @property
    def log10_l2(self) -> float:
        """The penalty's exponent in the project's log10 convention (HyperSpace.l2)."""
        return self.log_l2 / math.log(10.0) if self.l2_base == "e" else self.log_l2


class QualityVariant(Section):
    """One stage instance: a protocol at a forward length."""
    protocol: str = Field(min_length=1)
    steps: int = Field(ge=1)  # forward steps T
    meta_iterations: Optional[int] = Field(default=None, ge=1)  # null: quality.meta_iterations


class QualityConfig(Section):
    """How good are DrMAD hypergradients? The MNIST MLP study of thesis 3.1 (algorithms §8)."""
    data: DataConfig = DataConfig(source="mnist5k", train_size=3000, val_size=1000, test_size=1000)
    protocols: dict[str, QualityProtocol] = Field(default_factory=lambda: {
        "thesis": QualityProtocol(),
        "relu_uncentred": QualityProtocol(activation="relu", biases="plain", pixels="unit"),
        "standardised": QualityProtocol(activation="relu", batch_size=100, alpha=0.3, momentum=0.9, l2_base="10",
                                        init_scale=0.0, z0_log_scale=None, biases="plain", pixels="standardised",
                                        multiplier=1.0)})
    variants: dict[str, QualityVariant] = Field(default_factory=lambda: {
        "thesis-200": QualityVariant(protocol="thesis", steps=200), "thesis-2000": QualityVariant(protocol="thesis", steps=2000),
        "thesis-20000": QualityVariant(protocol="thesis", steps=20000, meta_iterations=2),
        **{f"relu_uncentred-{t}": QualityVariant(protocol="relu_uncentred", steps=t, meta_iterations=3) for t in (200, 2000)}})
    scale_bounds: list[float] = Field(default_factory=lambda: [-3.0, 3.0], min_length=2, max_length=2)
    meta_iterations: int = Field(default=10, ge=1)  # per variant unless it names its own (thesis: 20)
    hyper_step: float = Field(default=0.07, gt=0.0)  # sign step of s, following DrMAD (the scripts: 0.07)
    hyper_momentum: float = Field(default=0.0, ge=0.0, lt=1.0)
    drmad_steps: int = Field(default=200, ge=1)  # DrMAD with a fixed S, next to the heuristic's
    max_reverse_steps: int = Field(default=100_000, ge=1)
    step_map: Literal["same", "stride", "nearest"] = "same"
    last: int = Field(default=100, ge=1)  # DrMAD2: float reversal of the last K steps
    truncate: list[Union[Literal["S"], int]] = Field(default_factory=lambda: [100, "S"])  # truncated reversal's K
    neumann_terms: list[int] = Field(default_factory=lambda: [10, 100, 1000])  # implicit differentiation's series
    neumann_step: Optional[float] = Field(default=None, gt=0.0)  # the series' step (None: the training alpha)
    hvp_cost: float = Field(default=2.2, gt=0.0)  # one HVP of this MLP in gradient evaluations (declared)
    trace_points: int = Field(default=400, ge=2)  # reverse-pass rows kept per meta-iteration
    dtype: Literal["float64", "float32"] = "float64"

    @model_validator(mode="after")
    def _checks(self):
        low, high = self.scale_bounds
        if low >= high:
            raise ValueError(f"scale_bounds: [low, high] with low < high, got {self.scale_bounds}")
        for name, protocol in self.protocols.items():
            if not low <= protocol.init_scale <= high:
                raise ValueError(f"protocols.{name}.init_scale: must lie within scale_bounds {self.scale_bounds}")
        check_names(self.variants, "variants")
        check_names(self.protocols, "protocols")
        if any(k != "S" and k < 1 for k in self.truncate):
            raise ValueError(f"truncate: each K a step count >= 1 or S (got {self.truncate})")
        if any(n < 0 for n in self.neumann_terms):
            raise ValueError(f"neumann_terms: each a count >= 0 (got {self.neumann_terms})")
        for name, variant in self.variants.items():
            if variant.protocol not in self.protocols:
                raise ValueError(f"variants.{name}.protocol: one of {', '.join(self.protocols)} (got {variant.protocol!r})")
        return self

    def protocol(self, name: str) -> QualityProtocol:
        return self.protocols[self.variants[name].protocol]

    def meta_iterations_of(self, name: str) -> int:
        return self.variants[name].meta_iterations or self.meta_iterations


class TrajectoryConfig(Section):
    """The training trajectory of the quality MLP (thesis figs 2.1-2.2)."""
    protocol: str = "thesis"  # which of quality.protocols trains the MLP
    steps: int = Field(default=2000, ge=2)
    every: int = Field(default=10, ge=1)  # keep every n-th iterate
    coordinates: int = Field(default=3, ge=1)  # random single coordinates plotted against the iteration


class SearchSpace(Section):
    """The peers' space: [low, high] of each hyperparameter, sampled uniformly (both are logs)."""
    log10_l2: list[float] = Field(default_factory=lambda: [-7.0, -1.0], min_length=2, max_length=2)
    log10_alpha: list[float] = Field(default_factory=lambda: [-1.0, 0.5], min_length=2, max_length=2)

    @model_validator(mode="after")
    def _ranges(self):
        for key, (low, high) in (("log10_l2", self.log10_l2), ("log10_alpha", self.log10_alpha)):
            if low >= high:
                raise ValueError(f"{key}: [low, high] with low < high, got {[low, high]}")
        if not (-30.0 <= self.log10_l2[0] and self.log10_l2[1] <= 3.0):
            raise ValueError(f"log10_l2: within [-30, 3] (got {self.log10_l2})")
        if not (-6.0 <= self.log10_alpha[0] and self.log10_alpha[1] <= 2.0):
            raise ValueError(f"log10_alpha: within [-6, 2] (got {self.log10_alpha})")
        return self


class SearchConfig(Section):
    """Random search and TPE (Optuna), each trial a short training at the baseline's settings
    otherwise, at DrMAD's counted work. `random` and `tpe` search DrMAD's space, the global log10
    L2 at the baseline's step size; `random-step` and `tpe-step` the log10 step size as well."""
    samplers: list[Literal["random", "tpe", "random-step", "tpe-step"]] = Field(
        default_factory=lambda: ["random", "tpe", "random-step", "tpe-step"], min_length=1)
    space: SearchSpace = SearchSpace()
    trial_epochs: int = Field(default=2, ge=1)  # each trial: this many epochs, the baseline's schedule compressed
    # Gradient evaluations to spend: `drmad` (the mean counted work of the drmad@INIT runs) or a number.
    budget: Union[Literal["drmad"], float] = "drmad"
    tpe_startup_trials: int = Field(default=4, ge=1)  # TPE samples at random until this many trials are done
    storage: Optional[str] = None  # Optuna RDB URL; null: a SQLite file per study under checkpoints/search/
    # Workers' heartbeat period; a trial silent for twice this long is failed and redone (a worker died).
    heartbeat_s: int = Field(default=30, ge=1)

    @field_validator("budget", mode="before")
    @classmethod
    def _budget(cls, value):
        if value == "drmad" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError(f"`drmad` or a number of gradient evaluations > 0 (got {value!r})")

    @model_validator(mode="after")
    def _checks(self):
        if len(set(self.samplers)) != len(self.samplers):
            raise ValueError(f"samplers: each at most once (got {self.samplers})")
        if self.storage is not None and not re.match(r"^(sqlite|postgresql|mysql)(\+\w+)?://", self.storage):
            raise ValueError(f"storage: an Optuna RDB URL (sqlite:///..., postgresql://...) or null (got {self.storage!r})")
        return self


class FinalConfig(Section):
    """Finalists: every method's choice retrained from scratch at the baseline's schedule."""
    seeds: list[int] = Field(default_factory=lambda: [1, 2, 3])  # init, batch order and masks
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)  # of the intervals in the verdict

    @model_validator(mode="after")
    def _seeds(self):
        if len(self.seeds) < 2:
            raise ValueError(f"seeds: at least 2 (an interval needs a spread; got {self.seeds})")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: distinct seeds (got {self.seeds})")
        if any(not 0 <= s <= SEED_MAX for s in self.seeds):
            raise ValueError(f"seeds: each within [0, {SEED_MAX}] (got {self.seeds})")
        return self


class ArenaConfig(Section):
    """The verdict's MLP arena (pipeline/experiments/arena.py): per seed, every method tunes the
    quality study's MLP at one counted budget, then its choice is retrained and tested."""
    protocol: str = "thesis"  # a key of quality.protocols
    seeds: list[int] = Field(default_factory=lambda: list(range(10)))  # one stage instance each
    steps: int = Field(default=1000, ge=2)  # T of every training (tuning and final)
    budget: float = Field(default=10_000.0, gt=0.0)  # gradient evaluations per method and seed
    log_scale: list[float] = Field(default_factory=lambda: [-1.0, 1.0], min_length=2, max_length=2)  # searches
    log_l2: list[float] = Field(default_factory=lambda: [-8.0, -1.0], min_length=2, max_length=2)  # protocol's base
    rungs: int = Field(default=4, ge=1)  # hyperband: validation error reported every T / rungs steps
    tpe_startup_trials: int = Field(default=4, ge=1)

    @model_validator(mode="after")
    def _checks(self):
        for key in ("log_scale", "log_l2"):
            low, high = getattr(self, key)
            if low >= high:
                raise ValueError(f"{key}: [low, high] with low < high, got {[low, high]}")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds: at least 2 distinct seeds (got {self.seeds})")
        if any(not 0 <= s <= SEED_MAX for s in self.seeds):
            raise ValueError(f"seeds: each within [0, {SEED_MAX}] (got {self.seeds})")
        if self.rungs > self.steps:
            raise ValueError(f"rungs: at most steps = {self.steps} (got {self.rungs})")
        return self


class VerdictConfig(Section):
    """How the verdict words a paired difference (pipeline/stats.py `decide`)."""
    margin_points: float = Field(default=0.5, gt=0.0, le=100.0)  # equivalence margin, percentage points


class ReportConfig(Section):
    last_n: int = Field(default=3, ge=1)  # DrMAD rows: mean test error of the last n meta-iterations


class EvaluationConfig(Section):
    """How DenseNet errors are measured. `precise`: BatchNorm population statistics recomputed
    over the training split before each evaluation (precise BN); `running`: the running
    averages training left (far from the population's after a few dozen steps)."""
    batchnorm: Literal["precise", "running"] = "precise"


class WorkConfig(Section):
    """How counted work is added up (pipeline/work.py)."""
    # One reverse step (a Hessian-vector product by double backward, which returns the gradient
    # too) in gradient evaluations, declared per model (bench/hypergrad.py --only hvp): the embedded
    # DenseNet-10 2.2 (drmad@INIT records the ratio it measures), DenseNet-40 3.2-3.7 on a 2-core
    # CPU (scales/paper.yaml: 3.5); the MLP's is quality.hvp_cost.
    hvp_cost: float = Field(default=2.2, gt=0.0)


class TrackingConfig(Section):
    experiment: str = Field(default="gbhpo", min_length=1)


class Params(Section):
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Hessian-vector products of the reverse passes: bench/hypergrad.py times both per device.
    hvp: Literal["double_backward", "forward_over_reverse"] = "double_backward"
    # Intra-op CPU threads per stage process; auto: the cores divided among the processes sharing them.
    threads: Union[Literal["auto"], int] = 1
    # Data-parallel ranks of the DenseNet training stages (torchrun; README "Scaling out").
    processes: int = Field(default=1, ge=1, le=1024)
    data: DataConfig = DataConfig(test_size=360)
    model: ModelConfig = ModelConfig()
    baseline: TrainConfig = TrainConfig()
    drmad: DrmadConfig = DrmadConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    quality: QualityConfig = QualityConfig()
    trajectory: TrajectoryConfig = TrajectoryConfig()
    search: SearchConfig = SearchConfig()
    final: FinalConfig = FinalConfig()
    arena: ArenaConfig = ArenaConfig()
    verdict: VerdictConfig = VerdictConfig()
    report: ReportConfig = ReportConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    work: WorkConfig = WorkConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("threads", mode="before")
    @classmethod
    def _threads(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1024):
            return value
        raise ValueError(f"a whole number from 1 to 1024, or auto (got {value!r})")

    @model_validator(mode="after")
    def _across_sections(self):
        if self.trajectory.protocol not in self.quality.protocols:
            raise ValueError(f"trajectory.protocol: one of {', '.join(self.quality.protocols)} (got {self.trajectory.protocol!r})")
        train = self.data.train_count
        for key in ("baseline", "drmad", "adaptive"):  # search trials and finalists use the baseline's
            if getattr(self, key).batch_size > train:
                raise ValueError(f"{key}.batch_size: at most the {train} training images of data "
                                 f"(got {getattr(self, key).batch_size})")
            if getattr(self, key).batch_size % self.processes:
                raise ValueError(f"{key}.batch_size: must split evenly over processes: {self.processes} "
                                 f"(got {getattr(self, key).batch_size})")
        pooled = train + self.data.val_size
        for name, variant in self.adaptive.variants.items():
            if variant.val_size is not None and pooled - variant.val_size < self.adaptive.batch_size:
                raise ValueError(f"adaptive.variants.{name}.val_size: leaves {pooled - variant.val_size} of the "
                                 f"{pooled} train+val images for training, fewer than adaptive.batch_size")
        if self.arena.protocol not in self.quality.protocols:
            raise ValueError(f"arena.protocol: one of {', '.join(self.quality.protocols)} (got {self.arena.protocol!r})")
        low, high = self.quality.scale_bounds
        if not low <= self.arena.log_scale[0] < self.arena.log_scale[1] <= high:
            raise ValueError(f"arena.log_scale: within quality.scale_bounds {self.quality.scale_bounds} "
                             f"(got {self.arena.log_scale})")
        for name, protocol in self.quality.protocols.items():
            if protocol.batch_size > self.quality.data.train_count:
                raise ValueError(f"quality.protocols.{name}.batch_size: at most the {self.quality.data.train_count} "
                                 f"training images of quality.data (got {protocol.batch_size})")
        return self


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats (PyYAML would read `1e-4` as a string), and no duplicate keys (PyYAML
    would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?(?:[eE][-+]?\d+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."))


def _resolve_float_or_int(loader, node):
    text = loader.construct_scalar(node)
    try:
        return int(text)
    except ValueError:
        return yaml.SafeLoader.construct_yaml_float(loader, node)


_Loader.add_constructor("tag:yaml.org,2002:float", _resolve_float_or_int)


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe(err: dict, model: type[BaseModel]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind, given = err["type"], err.get("input")
    if kind == "extra_forbidden":
        parent = model
        for part in err["loc"][:-1]:
            parent = parent.model_fields[part].annotation
        return f"{loc}: unknown key; allowed here: {', '.join(parent.model_fields)}"
    if kind == "value_error":  # our own validators already name the key
        prefix, msg = ".".join(str(p) for p in err["loc"]), err["msg"].removeprefix("Value error, ")
        if not prefix:
            return msg
        # A section's validator names the key within it; a field's validator is about the field.
        return f"{prefix}.{msg}" if re.match(r"[\w.-]+: ", msg) else f"{prefix}: must be {msg}"
    if kind in _BOUNDS:
        return f"{loc}: must be {_BOUNDS[kind]} {next(iter(err['ctx'].values()))} (got {given!r})"
    return f"{loc}: {err['msg'].replace('Input should be', 'must be')} (got {given!r})"


def parse_params(raw: object, complete: bool = False) -> Params:
    """Validate settings; `complete` (a params file): every section must be there, none filled
    in from code defaults."""
    if raw is None:  # an empty file
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{PARAMS_FILE}: top level must be a mapping of sections, e.g. seed, data, baseline")
    if complete and (missing := [k for k in Params.model_fields if k not in raw]):
        raise ConfigError(f"{PARAMS_FILE}: missing section(s) {', '.join(missing)}; every section must be "
                          "given (see the shipped params.yaml)")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{PARAMS_FILE}: {_describe(exc.errors()[0], Params)}") from None


MAX_PARAMS_BYTES = 1 << 20  # the shipped params.yaml is 10 kB; a larger file is a mistake or an attack


def read_yaml(text: str, source: str = PARAMS_FILE) -> object:
    """YAML with 1.2 floats (`1e-4` is a number), as params.yaml is read. Anchors and aliases are
    refused before anything is built: nested aliases (a "billion laughs" file) expand to gigabytes."""
    for token in yaml.scan(text, Loader=_Loader):
        if isinstance(token, (yaml.AnchorToken, yaml.AliasToken)):
            raise ConfigError(f"{source}: line {token.start_mark.line + 1}: YAML anchors and aliases (&name, *name) "
                              "are not allowed; write each value out")
    return yaml.load(text, Loader=_Loader)


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    path = Path(path)
    try:
        if (size := path.stat().st_size) > MAX_PARAMS_BYTES:
            raise ConfigError(f"{path}: {size:,} bytes; at most {MAX_PARAMS_BYTES:,} (the shipped file is about 10 kB)")
        raw = read_yaml(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; run from the repository root") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        what = f": {exc.problem}" if getattr(exc, "problem", None) else ""
        raise ConfigError(f"{path}:{where} is not valid YAML{what}") from None
    return parse_params(raw, complete=True)


def flatten(params: BaseModel, prefix: str = "") -> dict[str, object]:
    """{'baseline.epochs': 10, ...}: the form MLflow params and `dvc params diff` use."""
    out: dict[str, object] = {}
    for key, value in params:
        name = f"{prefix}{key}"
        if isinstance(value, BaseModel):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
