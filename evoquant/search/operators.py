"""Variation operators on sparse genomes: plain functions, DEAP style, each returning a new genome.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed fixes a whole run.
"""

from __future__ import annotations

import numpy as np

from evoquant.search.genome import Genome, SearchSpace


def pick_tensors(space: SearchSpace, rng: np.random.Generator, count: int, *, with_residual: bool = False) -> np.ndarray:
    """Choose ``count`` distinct tensors, with probability growing like sqrt(size).

    sqrt: big tensors hold most weights and deserve more attempts, but a small first layer, where a single
    state matters a lot, must still be visited often.
    """
    candidates = [i for i, t in enumerate(space.tensors) if t.high > t.low and (t.rounding_residual is not None or not with_residual)]
    if not candidates:
        return np.empty(0, dtype=np.int64)
    weights = np.sqrt([space.tensors[i].size for i in candidates])
    count = min(count, len(candidates))
    return rng.choice(candidates, size=count, replace=False, p=weights / weights.sum())


def _count(fraction: float, size: int) -> int:
    return max(1, min(size, int(round(fraction * size))))


def mutate_random(genome: Genome, space: SearchSpace, rng: np.random.Generator, *, fraction: float, tensors: int, step: int = 1, only: int | None = None) -> Genome:
    """Move ``fraction`` of the weights of ``tensors`` random tensors (or of tensor ``only``) by ±``step``."""
    child = genome.copy()
    for tensor in pick_tensors(space, rng, tensors) if only is None else [only]:
        size = space.tensors[tensor].size
        indices = rng.choice(size, size=_count(fraction, size), replace=False)
        steps = rng.choice(np.array([-step, step]), size=len(indices))
        child.shifted(space, int(tensor), indices, steps)
    return child


def tie_pools(space: SearchSpace, pool_fraction: float) -> list[np.ndarray | None]:
    """Per tensor, the flat indices whose nearest rounding was closest to a tie (|residual| largest)."""
    pools: list[np.ndarray | None] = []
    for tensor in space.tensors:
        if tensor.rounding_residual is None:
            pools.append(None)
            continue
        order = np.argsort(-np.abs(tensor.rounding_residual), kind="stable")
        pools.append(order[: _count(pool_fraction, tensor.size)])
    return pools


def mutate_tie(genome: Genome, space: SearchSpace, rng: np.random.Generator, *, fraction: float, tensors: int, pools: list[np.ndarray | None], only: int | None = None) -> Genome:
    """Flip near-tie weights to the *other* neighbour of their exact value (or back, if already flipped).

    A weight whose exact state was 3.48 was rounded to 3; this moves it to 4 (the direction of its
    residual). Only weights in the tie pool are touched; tensors without an FP32 residual are skipped.
    """
    child = genome.copy()
    chosen = pick_tensors(space, rng, tensors, with_residual=True) if only is None else ([only] if pools[only] is not None else [])
    for tensor in chosen:
        pool = pools[tensor]
        indices = rng.choice(pool, size=_count(fraction, space.tensors[tensor].size) if len(pool) > 1 else 1, replace=len(pool) < 2)
        indices = np.unique(indices)
        residual = space.tensors[tensor].rounding_residual[indices]
        current = _current_deltas(child, int(tensor), indices)
        towards = np.where(residual >= 0, 1, -1)
        steps = np.where(current == 0, towards, -current)
        child.shifted(space, int(tensor), indices, steps)
    return child


def _current_deltas(genome: Genome, tensor: int, indices: np.ndarray) -> np.ndarray:
    if tensor not in genome.shifts:
        return np.zeros(len(indices), dtype=np.int64)
    shifted, deltas = genome.shifts[tensor]
    positions = np.searchsorted(shifted, indices)
    positions = np.minimum(positions, len(shifted) - 1)
    hit = shifted[positions] == indices
    return np.where(hit, deltas[positions], 0).astype(np.int64)


def crossover_tensorwise(first: Genome, second: Genome, rng: np.random.Generator) -> Genome:
    """A child that takes each tensor's shifts whole from one parent or the other.

    Whole tensors, because shifts inside one layer compensate each other; mixing them would break what
    selection found. Improvements found in different layers, though, combine.
    """
    child = Genome()
    for tensor in sorted(set(first.shifts) | set(second.shifts)):
        donor = first if rng.random() < 0.5 else second
        if tensor in donor.shifts:
            indices, deltas = donor.shifts[tensor]
            child.shifts[tensor] = (indices.copy(), deltas.copy())
    return child
