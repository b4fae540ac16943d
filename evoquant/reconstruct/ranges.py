"""The range-refit stage: how wide the activation quantizers' ranges should be for a reconstructed model.

NNCF sets each activation FakeQuantize's range to about an average calibration image's largest activation
(:mod:`evoquant.ir.ranges`), so larger ones are clipped. Once the weights are refitted (the reconstruct
stage) wider ranges end better: at W4A8 on the zoo, held-out KL after refine fell by 14-45 %
(``benchmarks/activation_ranges.py``, docs/reconstruct.md). NNCF's start itself barely moves with the
range, so a range can only be judged after a reconstruction. Each trial scales the ranges, reconstructs
the weights and scores the result end to end; the candidates are NNCF's ranges and/or the *observed*
ranges (each quantizer widened to cover every value its input takes on the fit images), and then,
outwards from the best of those, the ``factors`` times its ranges, each direction stopping at the first
that does not beat the best so far by ``min_gain``. With one candidate and no factors there is nothing to
choose: its ranges are taken with no trial (the default, ``observed``: on the zoo it reconstructed to a
better model than NNCF's ranges on held-out digits in every measured case).

The quantizer on the model's input is set apart: its range should be the input's declared range (an
image's range is the image's range), and NNCF's estimate from synthetic images falls short of it (a
data-free generator's pixels peaked at 0.945 where digits reach 1.0: every bright stroke was clipped).
With ``cover_input`` each candidate's ranges include it widened to the declared range (``extremes``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from evoquant.config import RangesConfig, ReconstructConfig
from evoquant.errors import EvoquantError
from evoquant.reconstruct.stage import ReconstructResult, reconstruct

#: ``score(model, table, states)``: the end-to-end objective of ``model`` with ``states`` (lower is better).
TrialScore = Callable[[object, object, dict], float]


@dataclass(frozen=True)
class RangeTrial:
    name: str  # "nncf", "observed", "nncf x1.25", "observed x1.25" ...
    score: float
    seconds: float


@dataclass
class RangesResult:
    """The chosen ranges (a factor per activation quantizer, by name; 1 for NNCF's), every trial, and the
    chosen trial's reconstruction (the reconstruct stage's result under those ranges: the same settings on
    the same model)."""

    chosen: str
    factors: dict[str, float]  # activation quantizers, by name
    trials: list[RangeTrial]
    quantizers: int  # activation quantizers with constant ranges (the ones a trial can scale)
    not_constant: tuple[str, ...]  # activation quantizers whose range is not a constant: left as they are
    reconstruction: ReconstructResult | None
    seconds: float = 0.0
    score_images: int = 0  # images each trial was scored on (set by the caller that scores)
    score_images_fitted_on: int = 0  # ... of which the reconstruction also fitted on (a small pool)
    input_factors: dict[str, float] = field(default_factory=dict)  # the model input's quantizers, widened to the declared range

    @property
    def all_factors(self) -> dict[str, float]:
        """Every quantizer's factor, the activations' and the model input's, by name: what the model is scaled by."""
        return {**self.factors, **self.input_factors}

    def to_dict(self) -> dict:
        factors = list(self.factors.values())
        return {"chosen": self.chosen, "trials": [asdict(trial) for trial in self.trials], "quantizers": self.quantizers,
                "widened": int(sum(factor != 1.0 for factor in factors)),
                "factor_median": float(np.median(factors)) if factors else 1.0, "factor_max": max(factors, default=1.0),
                "input_factors": self.input_factors,
                "factors": self.all_factors, "not_constant": list(self.not_constant), "seconds": self.seconds,
                "score_images": self.score_images, "score_images_fitted_on": self.score_images_fitted_on}


def trial_order(factors) -> tuple[list[float], list[float]]:
    """The factors above 1 in increasing order, those below 1 in decreasing order (outwards from 1)."""
    return sorted(f for f in factors if f > 1.0), sorted((f for f in factors if f < 1.0), reverse=True)


def scaled_copy(model, table, factors):
    """A copy of ``model`` with its activation ranges scaled (:func:`evoquant.ir.ranges.scale_activation_ranges`)
    and its weight table (``table``'s weights, checked)."""
    from evoquant.ir.ranges import scale_activation_ranges
    from evoquant.ir.weights import find_quantized_weights

    copy = model.clone()
    scale_activation_ranges(copy, factors)
    copy_table = find_quantized_weights(copy)
    if [weight.constant_name for weight in copy_table] != [weight.constant_name for weight in table]:
        raise EvoquantError("scaling the activation ranges changed the model's weights; report this model to the evoquant developers")
    return copy, copy_table


def fit_ranges(model, table, teacher, images, reconstruct_config: ReconstructConfig, config: RangesConfig, score: TrialScore, *,
               extremes: np.ndarray | None = None, progress: bool = False) -> RangesResult:
    """Choose the activation ranges for ``model`` (static shape; not modified): for each candidate, reconstruct
    a scaled copy against ``teacher`` on ``images`` and ``score`` it (see the module doc). ``extremes``: the
    declared input range's two end images as the model takes them (``config.cover_input``)."""
    from evoquant.ir.ranges import constant_range_quantizers, input_range_factors, observed_range_factors

    started = time.perf_counter()
    names, not_constant = constant_range_quantizers(model)
    inputs = input_range_factors(model, extremes) if config.cover_input and extremes is not None else {}
    if not names:
        return RangesResult("nncf", {}, [], 0, tuple(not_constant), None, time.perf_counter() - started, input_factors=inputs)
    fitted = min(reconstruct_config.images, len(images))
    candidates = {}
    for candidate in config.candidates:
        if candidate == "nncf":
            candidates[candidate] = dict.fromkeys(names, 1.0)
        else:
            candidates[candidate] = observed_range_factors(model, images[:fitted], reconstruct_config.batch_size)
    if len(candidates) == 1 and not config.factors:  # nothing to choose between: no trial
        (chosen, factors), = candidates.items()
        return RangesResult(chosen, factors, [], len(names), tuple(not_constant), None, time.perf_counter() - started, input_factors=inputs)
    trials: list[RangeTrial] = []
    best: list = []  # [name, factors, score, reconstruction]

    def trial(name: str, factors: dict[str, float]) -> bool:
        """Run one trial; whether it beat the best so far (by min_gain: the smaller change wins a near tie)."""
        trial_started = time.perf_counter()
        scaled, scaled_table = scaled_copy(model, table, {**factors, **inputs})
        rebuilt = reconstruct(scaled, scaled_table, teacher, images, reconstruct_config, progress=progress, label=f"ranges: {name}")
        value = float(score(scaled, scaled_table, dict(rebuilt.states)))
        trials.append(RangeTrial(name, value, round(time.perf_counter() - trial_started, 2)))
        if not best or value < best[2] * (1.0 - config.min_gain):
            best[:] = [name, factors, value, rebuilt]
            return True
        return False

    for name, factors in candidates.items():
        trial(name, factors)
    base_name, base = best[0], best[1]
    upward, downward = trial_order(config.factors)
    moved_up = False
    for factor in upward:
        if not trial(f"{base_name} x{factor:g}", {name: value * factor for name, value in base.items()}):
            break
        moved_up = True
    if not moved_up:  # widening further did not help: try narrowing (when asked for)
        for factor in downward:
            if not trial(f"{base_name} x{factor:g}", {name: value * factor for name, value in base.items()}):
                break
    chosen, factors, _, rebuilt = best
    return RangesResult(chosen, {name: float(value) for name, value in factors.items()}, trials, len(names), tuple(not_constant), rebuilt,
                        time.perf_counter() - started, input_factors=inputs)
