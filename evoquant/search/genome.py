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
        """Add ``steps`` to the deltas at the (unique) ``indices`` of ``tensor``, clipped to ``max_shift`` and
        to the tensor's bounds.

        Entries whose delta becomes zero are dropped (a move back to the starting state is a revert, not a
        shift). Vectorized: a genome of a long run holds tens of thousands of shifts per tensor.
        """
        spec = space.tensors[tensor]
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        order = np.argsort(indices, kind="stable")
        indices, steps = indices[order], np.asarray(steps, dtype=np.int64).reshape(-1)[order]
        if np.any(indices[1:] == indices[:-1]):
            raise ValueError("shifted() takes each index at most once")
        old_indices, old_deltas = self.shifts.get(tensor, (np.empty(0, np.int64), np.empty(0, np.int8)))
        # Both sorted and unique, so the indices they share come in the same order in each.
        in_old = np.isin(old_indices, indices, assume_unique=True)
        current = np.zeros(len(indices), dtype=np.int64)
        current[np.isin(indices, old_indices, assume_unique=True)] = old_deltas[in_old]
        start = spec.states[indices].astype(np.int64)
        delta = np.clip(current + steps, -space.max_shift, space.max_shift)
        delta = np.maximum(spec.low - start, np.minimum(spec.high - start, delta))
        moved = delta != 0
        merged = np.concatenate([old_indices[~in_old], indices[moved]])
        deltas = np.concatenate([old_deltas[~in_old], delta[moved].astype(np.int8)])
        if merged.size:
            order = np.argsort(merged, kind="stable")
            self.shifts[tensor] = (merged[order], deltas[order])
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


def shifts_between(start: np.ndarray, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The inverse of :func:`apply_shifts`: ``states`` as flat indices and deltas from ``start`` (any shape),
    the form a genome payload holds."""
    delta = (np.asarray(states, dtype=np.int32) - np.asarray(start, dtype=np.int32)).reshape(-1)
    indices = np.flatnonzero(delta)
    return indices.astype(np.int64), delta[indices].astype(np.int8)


def members_to_arrays(members: list[tuple[Payload, float]]) -> dict[str, np.ndarray]:
    """Genomes with their fitness as named arrays for an .npz (no pickle): ``fitness`` and, per member n
    and tensor t, ``g{n}_t{t}_indices`` / ``g{n}_t{t}_deltas``. :func:`members_from_arrays` reverses it."""
    arrays = {"fitness": np.array([fitness for _, fitness in members], dtype=np.float64)}
    for number, (payload, _) in enumerate(members):
        for tensor, (indices, deltas) in payload.items():
            arrays[f"g{number}_t{tensor}_indices"], arrays[f"g{number}_t{tensor}_deltas"] = indices, deltas
    return arrays


def members_from_arrays(archive) -> list[tuple[Payload, float]]:
    """The genomes and fitnesses :func:`members_to_arrays` stored in ``archive`` (an open .npz)."""
    members: list[tuple[Payload, float]] = [({}, float(fitness)) for fitness in archive["fitness"]]
    for key in archive.files:
        if key.startswith("g") and key.endswith("_indices"):
            number, tensor = (int(part[1:]) for part in key[: -len("_indices")].split("_"))
            members[number][0][tensor] = (archive[key], archive[key.replace("_indices", "_deltas")])
    return [(dict(sorted(payload.items())), fitness) for payload, fitness in members]
