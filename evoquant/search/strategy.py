"""The (mu + lambda) evolution strategy over sparse genomes, built on DEAP's toolbox.

The search never sees OpenVINO: it gets a :class:`SearchSpace` (numpy arrays) and an ``evaluate`` function
that maps a genome's plain payload to a fitness (lower is better). Parallelism is DEAP's swap point:
whatever is registered as ``toolbox.map`` evaluates a generation's payloads, in this process or elsewhere.
Only payloads (dicts of numpy arrays) are mapped, never DEAP ``creator`` objects, which don't exist in
worker processes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from deap import base, creator, tools

from evoquant.config import SearchConfig
from evoquant.search.genome import Genome, Payload, SearchSpace, members_from_arrays, members_to_arrays, payload_key
from evoquant.search.operators import crossover_tensorwise, mutate_random, mutate_tie, pick_tensors, tie_pools

if not hasattr(creator, "EvoquantFitness"):
    creator.create("EvoquantFitness", base.Fitness, weights=(-1.0,))
    creator.create("EvoquantIndividual", Genome, fitness=creator.EvoquantFitness)


@dataclass(frozen=True)
class GenerationStats:
    """One line of the search history."""

    generation: int
    evaluations: int
    best: float
    mean: float
    best_shifts: int
    mutation_fraction: float
    elapsed: float
    progress: float  # share of the tightest budget used, in [0, 1]


@dataclass
class SearchResult:
    """What the strategy found. ``start_fitness`` is the starting model's (the empty genome's)."""

    best: Genome
    best_fitness: float
    start_fitness: float
    evaluations: int
    stop_reason: str
    history: list[GenerationStats] = field(default_factory=list)
    elapsed: float = 0.0


class Termination:
    """Budgets in generations, evaluations and wall time, plus patience; reports progress in [0, 1]."""

    def __init__(self, config: SearchConfig):
        self.config = config
        self.started = time.perf_counter()
        self.best = math.inf
        self.stale = 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def update(self, best: float) -> None:
        if best < self.best - self.config.min_improvement * abs(self.best if math.isfinite(self.best) else best):
            self.best, self.stale = best, 0
        else:
            self.best, self.stale = min(self.best, best), self.stale + 1

    def progress(self, generation: int, evaluations: int) -> float:
        shares = [generation / self.config.generations if self.config.generations else 1.0]
        if self.config.max_evaluations:
            shares.append(evaluations / self.config.max_evaluations)
        if self.config.time_limit:
            shares.append(self.elapsed() / self.config.time_limit)
        return float(min(1.0, max(shares)))

    def reason(self, generation: int, evaluations: int) -> str | None:
        config = self.config
        if generation >= config.generations:
            return "generations"
        if config.max_evaluations and evaluations + config.lambda_ > config.max_evaluations:
            return "evaluations"
        if config.time_limit and self.elapsed() >= config.time_limit:
            return "time"
        if config.patience and self.stale >= config.patience:
            return "converged"
        return None


class StepSize:
    """The share of a tensor's weights one mutation moves, adapted by Rechenberg's 1/5 success rule.

    When more than a fifth of a generation's offspring beat the best parent, moves are too timid: grow
    them; when fewer do, they overshoot: shrink them. Early generations take big steps, later ones refine.
    """

    def __init__(self, config: SearchConfig):
        self.fraction = config.mutation_fraction
        self.adaptive = config.adapt_mutation
        self.low, self.high = config.mutation_fraction_min, config.mutation_fraction_max

    def update(self, success_rate: float) -> None:
        if self.adaptive:
            factor = 1.5 if success_rate > 0.2 else (1.5 ** -0.25 if success_rate < 0.2 else 1.0)
            self.fraction = float(min(self.high, max(self.low, self.fraction * factor)))


def make_toolbox(space: SearchSpace, config: SearchConfig, rng: np.random.Generator, evaluate: Callable[[Payload], float], map_function: Callable = map, step: StepSize | None = None) -> base.Toolbox:
    """The DEAP toolbox: ``mutate``, ``mate``, ``select``, ``evaluate`` and the ``map`` swap point."""
    toolbox = base.Toolbox()
    pools = tie_pools(space, config.tie_pool) if space.has_residuals else None
    step = step or StepSize(config)

    def mutate(genome: Genome, only: int | None = None) -> Genome:
        if pools is not None and rng.random() < config.tie_probability and (only is None or pools[only] is not None):
            child = mutate_tie(genome, space, rng, fraction=step.fraction, tensors=config.mutation_tensors, pools=pools, only=only)
        else:
            child = mutate_random(genome, space, rng, fraction=step.fraction, tensors=config.mutation_tensors, step=config.mutation_step, only=only)
        return creator.EvoquantIndividual(child.shifts)

    toolbox.register("mutate", mutate)
    toolbox.register("mate", lambda a, b: creator.EvoquantIndividual(crossover_tensorwise(a, b, rng).shifts))
    toolbox.register("select", tools.selBest)
    toolbox.register("evaluate", evaluate)
    toolbox.register("map", map_function)
    return toolbox


@dataclass
class SearchState:
    """Everything needed to continue a search exactly where it stopped: plain data (numpy arrays, numbers),
    picklable for island workers and saved by :meth:`save` as one .npz (written atomically, no pickle)."""

    generation: int
    evaluations: int
    start_fitness: float
    population: list[tuple[Payload, float]]  # parents, best first
    seen: dict[bytes, float]  # fitness of every genome evaluated, by genome digest
    rng: dict  # numpy bit generator state
    fraction: float  # the adapted mutation fraction
    best: float  # termination's best and stale count (patience)
    stale: int
    elapsed: float  # search seconds so far
    history: list[GenerationStats] = field(default_factory=list)
    stop_reason: str | None = None

    def save(self, path) -> None:
        import json

        from evoquant.paths import staged

        meta = {key: getattr(self, key) for key in ("generation", "evaluations", "start_fitness", "rng", "fraction", "best", "stale", "elapsed", "stop_reason")}
        meta["history"] = [dataclasses.asdict(stats) for stats in self.history]
        arrays = {"meta": np.array(json.dumps(meta)), "seen_keys": np.frombuffer(b"".join(self.seen), np.uint8).reshape(len(self.seen), -1) if self.seen else np.zeros((0, 16), np.uint8),
                  "seen_values": np.array(list(self.seen.values()), dtype=np.float64), **members_to_arrays(self.population)}
        with staged(path, suffix=".npz") as temporary:
            np.savez(temporary, **arrays)

    @classmethod
    def load(cls, path) -> "SearchState":
        import json

        with np.load(path, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            population = members_from_arrays(archive)
            seen = dict(zip((bytes(row) for row in archive["seen_keys"]), archive["seen_values"].tolist()))
        history = [GenerationStats(**stats) for stats in meta.pop("history")]
        return cls(population=population, seen=seen, history=history, **meta)


def genome_digest(payload: Payload) -> bytes:
    """A 16-byte identity of a genome (what the search remembers of every genome it evaluated)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for tensor, indices, deltas in payload_key(payload):
        digest.update(tensor.to_bytes(4, "little"))
        digest.update(len(indices).to_bytes(8, "little"))
        digest.update(indices)
        digest.update(deltas)
    return digest.digest()


class Search:
    """The strategy as an object whose whole state can be saved and restored (:meth:`state`, ``state=``):
    what resumable runs and islands (:mod:`evoquant.search.islands`) are built on.

    Each generation makes ``lambda_`` offspring from the current ``mu`` parents (crossover with probability
    ``crossover_probability``, then always a mutation), evaluates only genomes not seen before, and keeps the
    best ``mu`` of parents and offspring (elitism: the best never gets worse).
    """

    def __init__(self, space: SearchSpace, evaluate: Callable[[Payload], float], config: SearchConfig, *,
                 map_function: Callable[[Callable, Iterable], Iterable[float]] = map, state: SearchState | None = None, seed: int | None = None):
        self.config = config
        self.rng = np.random.default_rng(config.seed if seed is None else seed)
        self.step = StepSize(config)
        self.toolbox = make_toolbox(space, config, self.rng, evaluate, map_function, self.step)
        self.space = space
        self.termination = Termination(config)
        if state is None:
            self.seen: dict[bytes, float] = {}
            self.evaluations = 0
            self.generation = 0
            self.history: list[GenerationStats] = []
            start = creator.EvoquantIndividual()
            self._assess([start])
            self.population = [start]
            self.start_fitness = start.fitness.values[0]
            self.termination.update(self.start_fitness)
            self.stop_reason = self.termination.reason(self.generation, self.evaluations)
        else:
            self.seen, self.evaluations, self.generation = dict(state.seen), state.evaluations, state.generation
            self.history, self.start_fitness, self.stop_reason = list(state.history), state.start_fitness, state.stop_reason
            self.population = [self._individual(payload, fitness) for payload, fitness in state.population]
            self.rng.bit_generator.state = state.rng
            self.step.fraction = state.fraction
            self.termination.best, self.termination.stale = state.best, state.stale
            self.termination.started -= state.elapsed

    @staticmethod
    def _individual(payload: Payload, fitness: float):
        individual = creator.EvoquantIndividual(payload)
        individual.fitness.values = (float(fitness),)
        return individual

    def _assess(self, individuals: list) -> None:
        pending = {id(ind): genome_digest(ind.shifts) for ind in individuals if not ind.fitness.valid}
        unique = {digest: ind for ind in individuals if (digest := pending.get(id(ind))) is not None and digest not in self.seen}
        values = list(self.toolbox.map(self.toolbox.evaluate, [ind.payload() for ind in unique.values()]))
        self.evaluations += len(unique)
        for digest, value in zip(unique, values):
            self.seen[digest] = float(value)
        for ind in individuals:
            if id(ind) in pending:
                ind.fitness.values = (self.seen[pending[id(ind)]],)

    def next_generation(self) -> GenerationStats:
        """Make, evaluate and select one generation."""
        config = self.config
        self.generation += 1
        offspring = _generation(self.toolbox, self.population, self.rng, config, self.space)
        self._assess(offspring)
        parent_best = self.population[0].fitness.values[0]
        self.step.update(float(np.mean([ind.fitness.values[0] < parent_best for ind in offspring])))
        self.population = self.toolbox.select(self.population + offspring, config.mu)
        best = self.population[0]
        self.termination.update(best.fitness.values[0])
        stats = GenerationStats(
            generation=self.generation,
            evaluations=self.evaluations,
            best=best.fitness.values[0],
            mean=float(np.mean([ind.fitness.values[0] for ind in offspring])),
            best_shifts=best.n_shifts,
            mutation_fraction=self.step.fraction,
            elapsed=self.termination.elapsed(),
            progress=self.termination.progress(self.generation, self.evaluations),
        )
        self.history.append(stats)
        self.stop_reason = self.termination.reason(self.generation, self.evaluations)
        return stats

    def run(self, *, callback: Callable[[GenerationStats], bool | None] | None = None, checkpoint: Callable[["SearchState"], None] | None = None,
            generations: int | None = None) -> str | None:
        """Run until a budget stops the search (or for at most ``generations`` more); after each generation
        ``checkpoint`` gets the state and ``callback`` the stats (True stops). Returns the stop reason
        (None: ``generations`` ran out first)."""
        for _ in range(generations if generations is not None else 2**62):
            if self.stop_reason is not None:
                break
            stats = self.next_generation()
            if callback is not None and callback(stats):
                self.stop_reason = "callback"
            if checkpoint is not None:
                checkpoint(self.state())
        return self.stop_reason

    def state(self) -> SearchState:
        return SearchState(
            generation=self.generation, evaluations=self.evaluations, start_fitness=self.start_fitness,
            population=[(ind.payload(), ind.fitness.values[0]) for ind in self.population], seen=dict(self.seen),
            rng=self.rng.bit_generator.state, fraction=self.step.fraction, best=self.termination.best, stale=self.termination.stale,
            elapsed=self.termination.elapsed(), history=list(self.history), stop_reason=self.stop_reason,
        )

    def result(self) -> SearchResult:
        best = self.population[0]
        return SearchResult(
            best=Genome(best.shifts),
            best_fitness=best.fitness.values[0],
            start_fitness=self.start_fitness,
            evaluations=self.evaluations,
            stop_reason=self.stop_reason or "generations",
            history=list(self.history),
            elapsed=self.termination.elapsed(),
        )


def evolve(
    space: SearchSpace,
    evaluate: Callable[[Payload], float],
    config: SearchConfig,
    *,
    map_function: Callable[[Callable, Iterable], Iterable[float]] = map,
    callback: Callable[[GenerationStats], bool | None] | None = None,
    state: SearchState | None = None,
    checkpoint: Callable[[SearchState], None] | None = None,
) -> SearchResult:
    """Run the strategy from the starting model (the empty genome), or from a saved ``state``, and return
    the best genome found. ``callback`` receives each generation's stats and may return True to stop;
    ``checkpoint`` receives the state after each generation. With a fixed ``config.seed`` and a
    deterministic ``evaluate`` the result is identical from run to run, whatever ``map_function`` runs it,
    and a run continued from a checkpoint ends as the uninterrupted run does.
    """
    search = Search(space, evaluate, config, map_function=map_function, state=state)
    search.run(callback=callback, checkpoint=checkpoint)
    return search.result()


def _generation(toolbox: base.Toolbox, population: list, rng: np.random.Generator, config: SearchConfig, space: SearchSpace) -> list:
    """A generation's offspring: independent, or in groups sharing a (parent, tensor) pair.

    Grouped offspring differ from one parent in one tensor each, so an evaluator that compiles one graph
    per (parent, layer) (the suffix engine) serves a whole group with one compile. Crossover children and
    multi-tensor mutations cannot be grouped so: with either, offspring are independent.
    """
    if not config.offspring_groups or config.crossover_probability > 0 or config.mutation_tensors != 1:
        return [_offspring(toolbox, population, rng, config) for _ in range(config.lambda_)]
    pairs = [(population[int(rng.integers(len(population)))], int(pick_tensors(space, rng, 1)[0])) for _ in range(config.offspring_groups)]
    return [toolbox.mutate(*pairs[i % len(pairs)]) for i in range(config.lambda_)]


def _offspring(toolbox: base.Toolbox, population: list, rng: np.random.Generator, config: SearchConfig):
    first = population[int(rng.integers(len(population)))]
    if len(population) > 1 and rng.random() < config.crossover_probability:
        second = population[int(rng.integers(len(population)))]
        first = toolbox.mate(first, second)
    return toolbox.mutate(first)
