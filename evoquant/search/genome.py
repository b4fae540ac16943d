"""The search space and the sparse genome: what the evolution strategy moves, and how far.

A genome is a set of *state shifts relative to the starting model*: for each touched tensor, sorted flat
indices and a non-zero integer delta each. It never holds a dense copy of the weights, so a candidate
costs bytes, not megabytes, to create, copy and send to a worker process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpace:
    """What the search needs to know about one quantized tensor (no OpenVINO objects)."""

    name: str
    states: np.ndarray  # flat int32 starting states
    low: int
    high: int
    rounding_residual: np.ndarray | None = None  # flat; exact state minus rounded state, in [-0.5, 0.5]

    @property
    def size(self) -> int:
        return int(self.states.size)


@dataclass(frozen=True)
class SearchSpace:
    """All tensors the search may touch, plus the largest total shift allowed per weight."""

    tensors: tuple[TensorSpace, ...]
    max_shift: int = 1

    @property
    def has_residuals(self) -> bool:
        return any(tensor.rounding_residual is not None for tensor in self.tensors)

    @classmethod
    def from_weights(cls, weights, max_shift: int = 1) -> "SearchSpace":
        """The space of a weight table (anything with ``consumer``, ``states``, ``low``, ``high`` and
        ``rounding_residual``, such as :class:`evoquant.ir.weights.WeightTable`), flattened."""
        return cls(
            tuple(
                TensorSpace(w.consumer, w.states.reshape(-1).copy(), w.low, w.high, None if w.rounding_residual is None else w.rounding_residual.reshape(-1))
                for w in weights
            ),
            max_shift=max_shift,
        )


Payload = dict[int, tuple[np.ndarray, np.ndarray]]
"""The plain form of a genome sent to workers: {tensor index: (flat indices int64, deltas int8)}."""


class Genome:
    """Sparse state shifts relative to the starting model.

    Invariants: per tensor, indices are sorted and unique, deltas are non-zero, and ``states + delta`` stays
    in ``[low, high]`` with ``|delta| <= max_shift`` (enforced by :meth:`shifted`).
    """

    __slots__ = ("shifts", "__dict__")

    def __init__(self, shifts: Payload | None = None):
        self.shifts: Payload = dict(shifts or {})

    def copy(self) -> "Genome":
        return type(self)({k: (idx.copy(), delta.copy()) for k, (idx, delta) in self.shifts.items()})

    @property
    def n_shifts(self) -> int:
        """How many weights differ from the starting model."""
        return sum(len(idx) for idx, _ in self.shifts.values())

    def payload(self) -> Payload:
        """A plain dict of numpy arrays: picklable without DEAP's creator classes."""
        return {k: (idx, delta) for k, (idx, delta) in self.shifts.items()}

    def key(self) -> tuple:
        """Hashable identity, to skip evaluating duplicates."""
        return payload_key(self.shifts)

    def shifted(self, space: SearchSpace, tensor: int, indices: np.ndarray, steps: np.ndarray) -> None:
        """Add ``steps`` to the deltas at ``indices`` of ``tensor``, clipped to the bounds and ``max_shift``.

        Later duplicates in ``indices`` win. Entries whose delta becomes zero are dropped (a move back to the
        starting state is a revert, not a shift).
        """
        spec = space.tensors[tensor]
        indices = np.asarray(indices, dtype=np.int64)
        current = dict(zip(*(arr.tolist() for arr in self.shifts.get(tensor, (np.empty(0, np.int64), np.empty(0, np.int8))))))
        start = spec.states[indices]
        for index, step, state in zip(indices.tolist(), np.asarray(steps).tolist(), start.tolist()):
            delta = current.get(index, 0) + int(step)
            delta = max(-space.max_shift, min(space.max_shift, delta))
            delta = max(spec.low - state, min(spec.high - state, delta))
            if delta:
                current[index] = delta
            else:
                current.pop(index, None)
        if current:
            order = sorted(current)
            self.shifts[tensor] = (np.array(order, dtype=np.int64), np.array([current[i] for i in order], dtype=np.int8))
        else:
            self.shifts.pop(tensor, None)


def payload_key(payload: Payload) -> tuple:
    """Hashable identity of a genome's payload (the same shifts give the same key)."""
    return tuple(sorted((tensor, idx.tobytes(), delta.tobytes()) for tensor, (idx, delta) in payload.items()))


def payload_from_key(key: tuple) -> Payload:
    """The payload a :func:`payload_key` was made from."""
    return {tensor: (np.frombuffer(idx, dtype=np.int64), np.frombuffer(delta, dtype=np.int8)) for tensor, idx, delta in key}


def apply_shifts(states: np.ndarray, indices: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """A copy of ``states`` (any shape) with ``deltas`` added at the flat ``indices``."""
    shifted = np.array(states, dtype=np.int32, copy=True)
    shifted.reshape(-1)[indices] += deltas.astype(np.int32)
    return shifted
