"""Frozen configuration dataclasses and YAML presets. No logic beyond loading and validation of keys.

Presets live in ``evoquant/configs/<name>.yaml`` (default, fast, thorough); a YAML file given by path works
the same. CLI flags and keyword arguments override preset values.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from evoquant.errors import EvoquantError

PRESET_DIR = Path(__file__).parent / "configs"


def _check_budget(config, prefix: str = "") -> None:
    """The budgets a search's termination reads (generations, evaluations, wall time, patience), checked
    alike for the evolve and compose stages; ``prefix`` names the section in the message."""
    if config.generations < 0:
        raise EvoquantError(f"{prefix}generations must be >= 0")
    if config.max_evaluations is not None and config.max_evaluations < 1:
        raise EvoquantError(f"{prefix}the evaluation budget must be at least 1 (leave it out for none), got {config.max_evaluations}")
    if config.time_limit is not None and not config.time_limit > 0:
        raise EvoquantError(f"{prefix}the time limit must be a positive number of seconds, got {config.time_limit}")
    if config.patience is not None and config.patience < 1:
        raise EvoquantError(f"{prefix}patience must be at least 1 generation (null: no early stop), got {config.patience}")


@dataclass(frozen=True)
class SearchConfig:
    """The evolution strategy: (mu + lambda) with elitism, sparse ±step mutations, budgets."""

    mu: int = 4  # parents kept each generation (the elite)
    lambda_: int = 8  # offspring per generation
    generations: int = 60
    max_evaluations: int | None = None
    time_limit: float | None = None  # seconds of search wall time
    patience: int | None = 20  # generations without improvement before stopping
    min_improvement: float = 1e-4  # relative improvement of the best that resets patience
    mutation_fraction: float = 0.03  # share of a tensor's weights moved by one mutation (the start, if adapted)
    adapt_mutation: bool = True  # adapt the fraction by the 1/5 success rule
    mutation_fraction_min: float = 0.001
    mutation_fraction_max: float = 0.2
    mutation_tensors: int = 1  # tensors touched by one mutation
    mutation_step: int = 1  # states moved per shift
    max_shift: int = 1  # largest total shift of one weight from its starting state
    tie_probability: float = 0.0  # chance a mutation is a tie flip (only with an FP32 reference)
    tie_pool: float = 0.1  # share of each tensor's weights, closest to a rounding tie, that tie flips draw from
    crossover_probability: float = 0.0  # tensor-wise crossover; off by default (benchmarks/ablation.py)
    offspring_groups: int = 0  # >0: offspring share this many (parent, tensor) pairs (when crossover is off and mutation_tensors 1)
    seed: int = 0
    # after reconstruct: add layer_penalty × start fitness × Σ layers' relative error increase (exact, from the
    # reconstruction's normal equations) to every candidate's fitness (0: off; one population only)
    layer_penalty: float = 0.0
    islands: int = 1  # populations evolving side by side (each on its own worker), exchanging migrants
    migration_interval: int = 5  # generations between migrations
    migrants: int = 1  # best genomes each island sends to the next in the ring

    def __post_init__(self):
        if self.mu < 1 or self.lambda_ < 1:
            raise EvoquantError("mu and lambda must be at least 1")
        if not 0 < self.mutation_fraction <= 1:
            raise EvoquantError(f"mutation fraction must be in (0, 1], got {self.mutation_fraction}")
        if self.mutation_step < 1 or self.max_shift < 1:
            raise EvoquantError("mutation step and max shift must be at least 1")
        _check_budget(self)
        if self.seed < 0:
            raise EvoquantError(f"the seed must be 0 or more, got {self.seed}")
        if not self.layer_penalty >= 0:
            raise EvoquantError(f"layer_penalty must be 0 or more, got {self.layer_penalty}")
        if self.offspring_groups < 0:
            raise EvoquantError(f"offspring_groups must be 0 or more, got {self.offspring_groups}")
        if self.islands < 1 or self.migration_interval < 1:
            raise EvoquantError(f"islands and the migration interval must be at least 1, got {self.islands} and {self.migration_interval}")
        if not 0 <= self.migrants <= self.mu:
            raise EvoquantError(f"migrants must be between 0 and mu ({self.mu}), got {self.migrants}")


@dataclass(frozen=True)
class ReconstructConfig:
    """The layer-wise reconstruction stage (see :mod:`evoquant.reconstruct`)."""

    images: int = 1024  # calibration images the layers are fitted on (drawn from the selection pool; 512 measured worse: docs/reconstruct.md)
    # more images, after those, that each solve is checked on: an output row (channel) whose error rises on
    # them keeps its starting states -- a layer with fewer rows than inputs (a fully-connected layer after
    # pooling) otherwise fits noise (0: no check)
    check_images: int = 0
    # where a layer's input rows come from: "quantized" (the quantized model as the plugin computes it, earlier
    # layers already solved: the solve also compensates upstream error) or "fp32" (the reference's own layer
    # inputs: rounding only; a layer whose quantized inputs SmoothQuant rescaled is left as it was, and the
    # report says so)
    inputs: str = "quantized"
    max_rows: int = 65536  # output rows (positions x images) a layer is fitted on at most
    damping: float = 0.01  # pull toward the anchor weights, relative to the mean input energy
    # what the damping pulls toward: "start" (the starting states' weights) or "fp32" (the FP32 layer's own
    # weight, where the reference holds it as a constant; the start elsewhere)
    anchor: str = "start"
    max_shift: int | None = 1  # states stay within this many of the start (None: the quantizer's range)
    act_order: bool = True  # quantize high-energy input columns first (GPTQ's order)
    batch_size: int = 64  # images per forward while gathering activations
    seed: int = 0  # which rows are sampled when a layer has more than max_rows
    solver: str = "output"  # the layer-wise solver (evoquant.reconstruct.solver.SOLVERS; benchmarks add baselines)

    def __post_init__(self):
        if self.images < 1 or self.max_rows < 1 or self.batch_size < 1:
            raise EvoquantError("reconstruct: images, max_rows and batch_size must be at least 1")
        if self.inputs not in ("quantized", "fp32"):
            raise EvoquantError(f"reconstruct: inputs must be 'quantized' or 'fp32', got {self.inputs!r}")
        if self.anchor not in ("start", "fp32"):
            raise EvoquantError(f"reconstruct: anchor must be 'start' or 'fp32', got {self.anchor!r}")
        if self.check_images < 0:
            raise EvoquantError(f"reconstruct: check_images must be 0 or more, got {self.check_images}")
        if self.damping <= 0:
            raise EvoquantError(f"reconstruct: damping must be positive, got {self.damping}")
        if self.max_shift is not None and self.max_shift < 1:
            raise EvoquantError(f"reconstruct: max_shift must be at least 1 (or null), got {self.max_shift}")


@dataclass(frozen=True)
class ComposeConfig:
    """The compose stage (:mod:`evoquant.search.compose`): which fit each layer takes, chosen by a small
    (mu + lambda) evolution strategy on the end-to-end objective. The fits are the starting states, the
    reconstruct stage's result and one more reconstruction per entry of ``fits`` (reconstruct settings
    that differ from the stage's, e.g. ``{inputs: fp32}``)."""

    fits: tuple = ({"inputs": "fp32"},)
    # pool images each candidate is scored on (drawn by importance like the search's selection): a candidate is
    # compiled anyway (most of its cost), and a few more images are cheap insurance against choosing by chance
    images: int = 2048
    mu: int = 4
    lambda_: int = 8
    generations: int = 20
    max_evaluations: int | None = None
    time_limit: float | None = None
    patience: int | None = 6
    # a generation whose best improves by less than this (relative) counts towards patience: on the zoo, runs
    # of sub-percent gains on the selection images moved held-out KL the wrong way (benchmarks/compose_scout.py)
    min_improvement: float = 0.01
    crossover_probability: float = 0.3
    segment_probability: float = 0.5  # a mutation gives a run of consecutive layers one fit (else one layer another)
    # racing: each child is scored on race_images of the images first and stops there when it is worse than
    # the worst parent there by more than race_margin (relative); 0 images: every child sees every image
    race_images: int = 512
    race_margin: float = 0.05
    # a search that finds nothing stops early: after scout_generations, unless the best genome beats the best
    # uniform genome by scout_gain (relative); 0 generations: never (docs/reconstruct.md, "Stopping early")
    scout_generations: int = 6
    scout_gain: float = 0.02
    # ... and, where it did find scout_gain, unless that genome also beats the best uniform one on the
    # verification images (the final gate's): a composition verification would reject stops the search there
    scout_verify: bool = True

    def __post_init__(self):
        fits = tuple(self.fits)
        object.__setattr__(self, "fits", fits)
        known = {f.name for f in dataclasses.fields(ReconstructConfig)}
        for fit in fits:
            if not isinstance(fit, dict) or not fit:
                raise EvoquantError(f"compose: each of fits must be a mapping of reconstruct settings, e.g. {{inputs: fp32}}, got {fit!r}")
            unknown = set(fit) - known
            if unknown:
                raise EvoquantError(f"compose: fits: unknown reconstruct setting(s) {', '.join(sorted(unknown))}")
            ReconstructConfig(**fit)  # checks the values
        if self.mu < 1 or self.lambda_ < 1 or self.images < 1:
            raise EvoquantError("compose: mu, lambda and images must be at least 1")
        if self.race_images < 0 or self.race_margin < 0:
            raise EvoquantError(f"compose: race_images and race_margin must be 0 or more, got {self.race_images} and {self.race_margin}")
        if self.scout_generations < 0 or not 0 <= self.scout_gain < 1:
            raise EvoquantError(f"compose: scout_generations must be 0 or more and scout_gain in [0, 1), got {self.scout_generations} and {self.scout_gain}")
        _check_budget(self, "compose: ")
        for name in ("crossover_probability", "segment_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise EvoquantError(f"compose: {name} must be in [0, 1], got {getattr(self, name)}")


#: The activation ranges the ranges stage can reconstruct under (evoquant.reconstruct.ranges).
RANGE_CANDIDATES = ("nncf", "observed")


@dataclass(frozen=True)
class RangesConfig:
    """The range-refit stage (:mod:`evoquant.reconstruct.ranges`): which activation ranges the weights are
    reconstructed under, chosen by reconstructing under each candidate and scoring the result end to end."""

    # the ranges to reconstruct under: "observed" (each activation quantizer widened to cover every value its
    # input takes on the fit images) and/or "nncf" (as calibrated); with several (or factors), each is
    # reconstructed and scored end to end, and the best taken; one alone is taken as it is, for free
    candidates: tuple = ("observed",)
    # then the best candidate times these factors, outwards from 1 (up first; down only when the first step up
    # loses), stopping at the first that does not win; each costs one reconstruction
    factors: tuple = ()
    # pool images each trial is scored on: the pool's last ones, after the images the reconstruction fits
    score_images: int = 1024
    # a later candidate wins only when it scores better than the best so far by this much (relative): the
    # smaller change wins a near tie (on fractal data a last step to x2 won by 3 % and lost on real digits)
    min_gain: float = 0.05
    # widen the quantizer on the model's input to the input's declared range (--input-range, mean/scale
    # values): NNCF estimates it from the calibration images, and synthetic ones rarely reach the range's ends
    cover_input: bool = True

    def __post_init__(self):
        factors = tuple(float(f) if isinstance(f, (int, float)) and not isinstance(f, bool) else f for f in self.factors)
        object.__setattr__(self, "factors", factors)
        if any(not isinstance(f, float) or not f > 0 or f == 1.0 for f in factors) or len(set(factors)) != len(factors):
            raise EvoquantError(f"ranges: factors must be distinct positive numbers other than 1, got {list(self.factors)}")
        candidates = tuple(self.candidates)
        object.__setattr__(self, "candidates", candidates)
        if not candidates or any(c not in RANGE_CANDIDATES for c in candidates) or len(set(candidates)) != len(candidates):
            raise EvoquantError(f"ranges: candidates must be one or more of {', '.join(RANGE_CANDIDATES)} without repeats, got {list(candidates)}")
        if self.score_images < 1:
            raise EvoquantError(f"ranges: score_images must be at least 1, got {self.score_images}")
        if not 0.0 <= self.min_gain < 1.0:
            raise EvoquantError(f"ranges: min_gain must be in [0, 1), got {self.min_gain}")


STAGES = ("ranges", "reconstruct", "compose", "evolve")
#: The sub-sections of a RefineConfig (YAML mappings of their own).
SECTIONS = {"search": SearchConfig, "reconstruct": ReconstructConfig, "compose": ComposeConfig, "ranges": RangesConfig}
BACKENDS = ("loky", "threading", "multiprocessing", "dask")
#: How the written IR stores 4-bit convolution weights (evoquant.ir.storage).
WEIGHT_STORAGE_MODES = ("auto", "keep", "widen")


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under a scheduler)."""
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class RefineConfig:
    """Everything ``refine`` needs besides the model, the reference and the data source."""

    search: SearchConfig = field(default_factory=SearchConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    ranges: RangesConfig = field(default_factory=RangesConfig)
    # which of ranges, reconstruct, compose, evolve run (always in that order); the search stages are opt-in:
    # compose (per-layer fits) moved held-out KL by 2 % for 2-3x the time, evolve (single weights) within noise
    # (docs/reconstruct.md)
    stages: tuple[str, ...] = ("ranges", "reconstruct")
    objective: str = "auto"  # auto | kl | mse | ce | agreement (or a hook given separately)
    data: str = "fractal"  # source spec for selection and verification batches
    selection_size: int = 512  # image draws the fitness is measured on during the search
    verification_size: int = 2048  # disjoint images that decide whether the result beats the start
    selection_pool: int = 4096  # images the selection is drawn from by importance (<= selection_size: off)
    importance: float = 0.7  # share of the draw proportional to the start model's per-image loss (0: uniform)
    value_range: tuple[float, float] = (0.0, 1.0)  # the model's expected input range
    mean_values: tuple[float, ...] | None = None  # per channel, subtracted after the range map (ovc's --mean_values)
    scale_values: tuple[float, ...] | None = None  # per channel, divided by after the mean (ovc's --scale_values)
    layout: str = "NCHW"  # the model's input layout: NCHW or NHWC
    data_seed: int = 1234
    jobs: int = 1
    backend: str = "loky"  # joblib backend: loky | threading | dask (needs a dask client)
    engine: str = "suffix"  # suffix: recompute from the changed layer where exact | plain: compile every candidate
    max_cache_mb: float = 512.0  # the suffix engine's activation cache budget, per process
    weight_storage: str = "auto"  # 4-bit convolution weights in the written IR: auto | keep | widen (evoquant.ir.storage)
    progress: bool = True

    def __post_init__(self):
        if self.selection_size < 1 or self.verification_size < 1:
            raise EvoquantError("selection and verification sizes must be at least 1")
        if not 0.0 <= self.importance <= 1.0:
            raise EvoquantError(f"the importance share must be in [0, 1], got {self.importance}")
        if self.selection_pool < 0:
            raise EvoquantError(f"the selection pool must be 0 or more images, got {self.selection_pool}")
        if self.jobs < 1:
            raise EvoquantError(f"--jobs must be at least 1, got {self.jobs}")
        if self.backend not in BACKENDS:
            raise EvoquantError(f"unknown backend {self.backend!r}; choose {', '.join(BACKENDS)}")
        if self.backend != "dask" and self.jobs > usable_cores():
            raise EvoquantError(f"--jobs {self.jobs}: this machine lets evoquant use {usable_cores()} CPU core(s), and more processes than "
                                "cores only slow each other down; use at most that many (or --backend dask for a cluster)")
        if self.engine not in ("plain", "suffix"):
            raise EvoquantError(f"unknown engine {self.engine!r}; choose plain or suffix")
        if self.weight_storage not in WEIGHT_STORAGE_MODES:
            raise EvoquantError(f"unknown weight storage {self.weight_storage!r}; choose {', '.join(WEIGHT_STORAGE_MODES)}")
        unknown = [stage for stage in self.stages if stage not in STAGES]
        if unknown or not self.stages or len(set(self.stages)) != len(self.stages):
            raise EvoquantError(f"stages must be a non-empty list of {', '.join(STAGES)} without repeats, got {','.join(self.stages)}")
        self.input_spec  # checks the range, values and layout

    @property
    def input_spec(self):
        """How the images become the model's input (:class:`evoquant.data.preprocess.InputSpec`)."""
        from evoquant.data.preprocess import InputSpec

        return InputSpec(tuple(self.value_range), self.mean_values, self.scale_values, self.layout)

    def replace(self, **changes) -> "RefineConfig":
        """A copy with top-level fields and/or ``search=`` fields changed; ``None`` values are ignored."""
        sections = {name: dataclasses.replace(getattr(self, name), **{k: v for k, v in changes.pop(name, {}).items() if v is not None}) for name in SECTIONS}
        top = {k: v for k, v in changes.items() if v is not None}
        if "stages" in top:
            top["stages"] = _stage_list(top["stages"])
        return dataclasses.replace(self, **sections, **top)

    def with_budget(self, stages: Sequence[str] | None = None, *, generations: int | None = None, max_evaluations: int | None = None,
                    time_limit: float | None = None) -> "RefineConfig":
        """The budgets given on the command line or to ``refine()``: they belong to the last search stage that
        runs of ``stages`` (default: this config's), evolve when it is among them, else compose; an error when
        neither is; ``None`` values are ignored."""
        budget = {"generations": generations, "max_evaluations": max_evaluations, "time_limit": time_limit}
        stages = tuple(stages or self.stages)
        if not {"compose", "evolve"} & set(stages) and any(value is not None for value in budget.values()):
            given = ", ".join(f"--{name.replace('_', '-')}" for name, value in budget.items() if value is not None)
            raise EvoquantError(f"{given} budget{'' if ',' in given else 's'} a search stage (compose or evolve), and neither runs "
                                f"({','.join(stages)}): add one, e.g. --stages {','.join(stages)},compose")
        return self.replace(**{"search" if "evolve" in stages else "compose": budget})

    @classmethod
    def from_yaml(cls, preset: str | Path = "default") -> "RefineConfig":
        """Load a preset by name (``default``, ``fast``, ``thorough``) or a YAML file by path."""
        path = Path(preset)
        if not path.suffix:
            path = PRESET_DIR / f"{preset}.yaml"
            if not path.is_file():
                names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
                raise EvoquantError(f"unknown preset {preset!r}; presets: {names}")
        if not path.is_file():
            raise EvoquantError(f"no such config file: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise EvoquantError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        return cls.from_dict(raw, source=path)

    def to_dict(self) -> dict:
        """Plain data (the inverse of :meth:`from_dict`): what a run directory records."""
        data = dataclasses.asdict(self)
        data["search"]["lambda"] = data["search"].pop("lambda_")
        data["compose"]["lambda"] = data["compose"].pop("lambda_")
        data["compose"]["fits"] = [dict(fit) for fit in self.compose.fits]
        data["ranges"]["factors"] = list(self.ranges.factors)
        data["ranges"]["candidates"] = list(self.ranges.candidates)
        data["stages"], data["value_range"] = list(self.stages), list(self.value_range)
        for key in ("mean_values", "scale_values"):
            data[key] = None if data[key] is None else list(data[key])
        return data

    @classmethod
    def from_dict(cls, raw: dict, source: str | Path = "config") -> "RefineConfig":
        """A config from a mapping as a YAML file holds it, every key and type checked (``source`` names it
        in errors)."""
        path = source
        if not isinstance(raw, dict):
            raise EvoquantError(f"{path} must hold a mapping of settings")
        raw = dict(raw)
        sections = {}
        for name, kind in SECTIONS.items():
            section = raw.pop(name, {}) or {}
            if not isinstance(section, dict):
                raise EvoquantError(f"{path}: {name} must be a mapping of settings, got {type(section).__name__}")
            section = dict(section)
            _check_keys(path, section, kind)
            if "lambda" in section:
                section["lambda_"] = section.pop("lambda")
            _check_types(path, section, kind, prefix=f"{name}.")
            sections[name] = section
        _check_keys(path, raw, cls, skip=set(SECTIONS))
        _check_types(path, raw, cls)
        if "stages" in raw:
            raw["stages"] = _stage_list(raw["stages"])
        if "value_range" in raw:
            value_range = raw["value_range"]
            if len(value_range) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value_range):
                raise EvoquantError(f"{path}: value_range must be two numbers [LOW, HIGH], got {value_range!r}")
            raw["value_range"] = tuple(value_range)
        for key in ("mean_values", "scale_values"):
            if raw.get(key) is not None:
                if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw[key]):
                    raise EvoquantError(f"{path}: {key} must be a list of numbers, one per channel, got {raw[key]!r}")
                raw[key] = tuple(float(v) for v in raw[key])
        return cls(**{name: kind(**sections[name]) for name, kind in SECTIONS.items()}, **raw)


def _check_types(path: Path, raw: dict, kind, prefix: str = "") -> None:
    """One line naming the key when a YAML value has the wrong type (``mu: 2.5``, ``value_range: 5``)."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(kind)}
    for key, value in raw.items():
        annotation = annotations.get(key, "")
        allowed = {part.strip().split("[")[0] for part in annotation.split("|")}
        ok = (
            (value is None and "None" in allowed)
            or (isinstance(value, bool) and "bool" in allowed)
            or (isinstance(value, int) and not isinstance(value, bool) and ("int" in allowed or "float" in allowed))
            or (isinstance(value, float) and "float" in allowed)
            or (isinstance(value, str) and ("str" in allowed or key == "stages"))
            or (isinstance(value, (list, tuple)) and "tuple" in allowed)
        )
        if not ok:
            shown = key if key != "lambda_" else "lambda"
            raise EvoquantError(f"{path}: {prefix}{shown} must be {annotation.replace('tuple', 'a list')}, got {value!r}")


def _stage_list(stages) -> tuple[str, ...]:
    """``"reconstruct,evolve"`` or a sequence of names → a tuple of names."""
    if isinstance(stages, str):
        stages = stages.split(",")
    return tuple(str(stage).strip() for stage in stages if str(stage).strip())


def _check_keys(path: Path, raw: dict, kind, skip=frozenset()) -> None:
    known = {f.name for f in dataclasses.fields(kind)} - set(skip)
    if kind in (SearchConfig, ComposeConfig):
        known |= {"lambda"}
    unknown = set(raw) - known
    if unknown:
        raise EvoquantError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
