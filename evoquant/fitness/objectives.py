"""Fitness objectives: lower is better, computed from model outputs.

The contract every objective, built-in or user hook, follows::

    objective(outputs, teacher, labels) -> float

* ``outputs``: list of float32 arrays, one per model output, batch first (the candidate INT8 model's).
* ``teacher``: the FP32 reference's outputs for the same batch, same layout, or ``None`` without reference.
* ``labels``: int64 array (N,) when the data source has labels, else ``None``.
* returns a finite float; **lower is better**. It must be deterministic (same inputs, same value).

KL and MSE are continuous: a ±1 shift of a handful of weights often leaves the top-1 decisions (and even
the outputs) unchanged, so accuracy-like objectives give the search almost no signal.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence

import numpy as np

from evoquant.errors import EvoquantError

Objective = Callable[[Sequence[np.ndarray], Sequence[np.ndarray] | None, np.ndarray | None], float]

OBJECTIVES: dict[str, Objective] = {}


def register_objective(name: str):
    """Decorator: make an objective available by name (``--objective NAME``)."""

    def decorate(function: Objective) -> Objective:
        OBJECTIVES[name] = function
        return function

    return decorate


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64).reshape(len(logits), -1)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _need_teacher(name: str, teacher) -> None:
    if teacher is None:
        raise EvoquantError(f"the {name!r} objective compares with the FP32 model: give --reference fp32.xml")


class SampleObjective:
    """A built-in objective made of per-image terms: ``sum(w * num) / sum(w * den)`` (den 1: a mean).

    Called like any objective; ``weights`` (one per image) turn it into the importance-weighted estimate
    of its value on the pool the images were drawn from (see :mod:`evoquant.fitness.sampling`). ``terms``
    gives the per-image numerators, which is what importance sampling draws by.
    """

    def __init__(self, terms: Callable[..., tuple[np.ndarray, np.ndarray | None]], doc: str):
        self.terms = terms
        self.__name__ = terms.__name__
        self.__doc__ = doc

    def __call__(self, outputs, teacher, labels=None, weights: np.ndarray | None = None) -> float:
        numerator, denominator = self.terms(outputs, teacher, labels)
        w = np.ones(len(numerator)) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(w) != len(numerator):
            raise EvoquantError(f"{len(w)} sample weights for {len(numerator)} images")
        total = float(np.dot(w, denominator)) if denominator is not None else float(w.sum())
        return float(np.dot(w, numerator)) / max(total, 1e-12)


def sample_objective(name: str):
    """Decorator: register per-image ``terms(outputs, teacher, labels) -> (num, den | None)`` as ``name``."""

    def decorate(terms):
        objective = SampleObjective(terms, terms.__doc__ or "")
        OBJECTIVES[name] = objective
        return objective

    return decorate


@sample_objective("kl")
def kl_to_teacher(outputs, teacher, labels=None):
    """Mean KL(teacher ‖ candidate) of the softmax of the first output (classifier logits)."""
    _need_teacher("kl", teacher)
    log_p = log_softmax(teacher[0])
    log_q = log_softmax(outputs[0])
    return np.sum(np.exp(log_p) * (log_p - log_q), axis=1), None


@sample_objective("mse")
def normalized_mse(outputs, teacher, labels=None):
    """Squared error over all outputs divided by the teacher's total energy (scale-free, any model)."""
    _need_teacher("mse", teacher)
    flat = lambda arrays: [np.asarray(a, dtype=np.float64).reshape(len(a), -1) for a in arrays]  # noqa: E731
    error = sum(np.sum((o - t) ** 2, axis=1) for o, t in zip(flat(outputs), flat(teacher)))
    energy = sum(np.sum(t**2, axis=1) for t in flat(teacher))
    return error, energy


@sample_objective("agreement")
def disagreement(outputs, teacher, labels=None):
    """1 - top-1 agreement with the teacher (coarse: use it to report, rarely to select)."""
    _need_teacher("agreement", teacher)
    return (top1(outputs[0]) != top1(teacher[0])).astype(np.float64), None


@sample_objective("ce")
def cross_entropy(outputs, teacher, labels=None):
    """Mean cross-entropy of the first output against the data source's labels (no teacher needed)."""
    if labels is None:
        raise EvoquantError("the 'ce' objective needs labelled data (an .npz with labels or a class folder)")
    log_q = log_softmax(outputs[0])
    return -log_q[np.arange(len(labels)), labels], None


def top1(outputs: np.ndarray) -> np.ndarray:
    """Each sample's arg-max class (outputs flattened per sample)."""
    return outputs.reshape(len(outputs), -1).argmax(1)


def top1_agreement(outputs: np.ndarray, teacher: np.ndarray) -> float:
    """Share of samples whose arg-max matches the teacher's."""
    return float(np.mean(top1(outputs) == top1(teacher)))


def accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of logits (N, C) against labels (N,)."""
    return float(np.mean(top1(outputs) == labels))


def looks_like_classifier(output_shapes: Sequence[tuple]) -> bool:
    """One output of per-sample shape (C,) with C > 1: treat as class logits."""
    return len(output_shapes) == 1 and len(output_shapes[0]) == 1 and output_shapes[0][0] not in ("1", "?")


def resolve_objective(name: str, output_shapes: Sequence[tuple]) -> str:
    """Turn ``auto`` into ``kl`` (classifiers) or ``mse`` (anything else); check the name exists."""
    if name == "auto":
        return "kl" if looks_like_classifier(output_shapes) else "mse"
    if name not in OBJECTIVES:
        raise EvoquantError(f"unknown objective {name!r}; choose from auto, {', '.join(sorted(OBJECTIVES))}, or give --fitness module:function")
    return name


def load_hook(spec: str) -> Objective:
    """Import a user fitness hook given as ``package.module:function``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise EvoquantError(f"--fitness must look like package.module:function, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an ImportError, or the user's module failing at import time
        raise EvoquantError(f"cannot import the fitness hook module {module_name!r}: {error}") from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise EvoquantError(f"{module_name!r} has no callable {attribute!r}")
    return function


def checked(value, source: str) -> float:
    """A hook's return value as a finite float, or a clear error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EvoquantError(f"the fitness {source} returned {type(value).__name__}, not a number") from None
    if not np.isfinite(number):
        raise EvoquantError(f"the fitness {source} returned {number}; it must return a finite float")
    return number
