"""Islands: N populations evolving side by side, each on its own worker, exchanging their best genomes.

Every ``migration_interval`` generations (an *epoch*) each island sends its best ``migrants`` genomes to
the next island in a ring (DEAP's ``migRing``); they replace the receiver's worst parents when better. An
island's epoch is a pure function of its state, so the result for a given seed and N is the same whatever
runs the epochs: this process, loky workers or a dask cluster, with any number of workers.

Island 0 uses the run's seed (one island is exactly the plain search); island i > 0 a seed derived from
(seed, i). Budgets (generations, evaluations, time, patience) are per island: N islands on N workers take
the wall time of one population and N times its evaluations.

Two ways to run them:

* :func:`run_islands` – one process drives all islands through a ``map`` over epochs (``--islands N``).
* :class:`FileMigration` – N separate processes (a job array, ``--island I/N``) each run one island and
  exchange migrants through files in a shared run directory, written atomically, read when present, never
  waiting for a missing peer (so the result depends on timing, unlike :func:`run_islands`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from evoquant.config import SearchConfig
from evoquant.search.genome import Payload, members_from_arrays, members_to_arrays
from evoquant.search.strategy import GenerationStats, SearchResult, SearchState, genome_digest

Migrants = list[tuple[Payload, float]]


def island_seed(seed: int, island: int) -> int:
    """The search seed of ``island``: the run's seed for island 0, a derived one for the others."""
    if island == 0:
        return seed
    return int(np.random.SeedSequence([seed, island]).generate_state(1)[0] % 2**31)


def island_config(config: SearchConfig, island: int) -> SearchConfig:
    return replace(config, seed=island_seed(config.seed, island))


def emigrants(state: SearchState, count: int) -> Migrants:
    """The best ``count`` genomes of an island, with their fitness."""
    return [(payload, fitness) for payload, fitness in state.population[:count]]


def receive(state: SearchState, arrivals: Migrants, config: SearchConfig) -> SearchState:
    """``state`` with ``arrivals`` (evaluated on the same fitness) in place of its worst parents, if better.

    Selection is DEAP's ``selBest`` (a stable sort by fitness, parents first); a better best counts as an
    improvement for patience, as in the search itself.
    """
    known = {genome_digest(payload) for payload, _ in state.population}
    seen = dict(state.seen)
    fresh = []
    for payload, fitness in arrivals:
        digest = genome_digest(payload)
        seen.setdefault(digest, float(fitness))
        if digest not in known:
            known.add(digest)
            fresh.append((payload, float(fitness)))
    if not fresh:
        return state
    population = sorted(state.population + fresh, key=lambda member: member[1])[: config.mu]
    best, stale = state.best, state.stale
    new_best = population[0][1]
    if new_best < best - config.min_improvement * abs(best if math.isfinite(best) else new_best):
        best, stale = new_best, 0
    return replace(state, population=population, seen=seen, best=min(best, new_best), stale=stale)


def ring_migration(states: Sequence[SearchState], config: SearchConfig) -> list[SearchState]:
    """Each island receives the best ``config.migrants`` of the island before it in the ring."""
    if config.migrants == 0 or len(states) < 2:
        return list(states)
    outgoing = [emigrants(state, config.migrants) for state in states]
    return [receive(state, outgoing[(i - 1) % len(states)], config) for i, state in enumerate(states)]


EpochRunner = Callable[[list[tuple[int, "SearchState | None"]], int], list[SearchState]]
"""Runs one epoch of the given islands: ``[(island, state or None for a fresh start)]`` and a number of
generations → their states after it (in the same order)."""


def run_islands(config: SearchConfig, run_epoch: EpochRunner, *, states: Sequence[SearchState] | None = None,
                checkpoint: Callable[[list[SearchState]], None] | None = None,
                callback: Callable[[GenerationStats], bool | None] | None = None) -> list[SearchState]:
    """Evolve ``config.islands`` islands epoch by epoch with ring migration until every island has stopped;
    ``states`` continues a saved run. ``checkpoint`` gets all states after each epoch's migration;
    ``callback`` the combined stats of the epoch's last generation (True stops every island)."""
    count = config.islands
    current: list[SearchState | None] = list(states) if states is not None else [None] * count
    if states is None:  # the start (generation 0) of every island, then migration cannot help yet
        current = run_epoch([(i, None) for i in range(count)], 0)
    while not all(state.stop_reason is not None for state in current):
        active = [(i, state) for i, state in enumerate(current) if state.stop_reason is None]
        for (i, _), state in zip(active, run_epoch(active, config.migration_interval)):
            current[i] = state
        current = ring_migration(current, config)
        if callback is not None and callback(combined_history(current)[-1]):
            current = [replace(state, stop_reason=state.stop_reason or "callback") for state in current]
        if checkpoint is not None:
            checkpoint(current)
    return current


def combined_history(states: Sequence[SearchState]) -> list[GenerationStats]:
    """One history for all islands: per generation, the best over islands, the mean of their means, the
    evaluations summed (an island that stopped early counts with its last generation)."""
    length = max((len(state.history) for state in states), default=0)
    history = []
    for g in range(length):
        rows = [state.history[min(g, len(state.history) - 1)] for state in states if state.history]
        best = min(rows, key=lambda row: row.best)
        history.append(GenerationStats(
            generation=g + 1, evaluations=sum(row.evaluations for row in rows), best=best.best, mean=float(np.mean([row.mean for row in rows])),
            best_shifts=best.best_shifts, mutation_fraction=float(np.mean([row.mutation_fraction for row in rows])),
            elapsed=max(row.elapsed for row in rows), progress=min(row.progress for row in rows),
        ))
    return history


def islands_result(states: Sequence[SearchState]) -> tuple[SearchResult, int]:
    """The best genome over all islands (ties: the lowest island) as one search result, and its island."""
    from evoquant.search.genome import Genome

    island = min(range(len(states)), key=lambda i: (states[i].population[0][1], i))
    best_payload, best_fitness = states[island].population[0]
    reasons = sorted({state.stop_reason or "generations" for state in states})
    return SearchResult(
        best=Genome(best_payload), best_fitness=best_fitness, start_fitness=states[0].start_fitness,
        evaluations=sum(state.evaluations for state in states), stop_reason=",".join(reasons),
        history=combined_history(states), elapsed=max(state.elapsed for state in states),
    ), island


class FileMigration:
    """Migration between separate processes through a shared folder (``--island I/N --run-dir SHARED``).

    Island I publishes its emigrants as ``SHARED/islands/I/migrants.npz`` (atomically replaced after each
    epoch) and reads ``SHARED/islands/(I-1 mod N)/migrants.npz`` when it exists; a missing or unreadable
    file is skipped (a peer that has not started, or crashed), never waited for.
    """

    def __init__(self, shared: Path, island: int, islands: int):
        self.island, self.islands = island, islands
        self.own = shared / "islands" / str(island) / "migrants.npz"
        self.peer = shared / "islands" / str((island - 1) % islands) / "migrants.npz"

    def publish(self, migrants: Migrants, generation: int) -> None:
        from evoquant.paths import staged

        with staged(self.own) as temporary:
            np.savez(temporary, generation=np.array(generation), **members_to_arrays(migrants))

    def collect(self) -> Migrants:
        if not self.peer.is_file():
            return []
        try:
            with np.load(self.peer, allow_pickle=False) as archive:
                return members_from_arrays(archive)
        except (OSError, ValueError, KeyError):  # a peer's file being replaced on a file system without atomic rename
            return []
