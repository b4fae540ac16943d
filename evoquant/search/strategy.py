"""The (mu + lambda) evolution strategy over sparse genomes, built on DEAP's toolbox.

The search never sees OpenVINO: it gets a :class:`SearchSpace` (numpy arrays) and an ``evaluate`` function
that maps a genome's plain payload to a fitness (lower is better). Parallelism is DEAP's swap point:
whatever is registered as ``toolbox.map`` evaluates a generation's payloads, in this process or elsewhere.
Only payloads (dicts of numpy arrays) are mapped, never DEAP ``creator`` objects, which don't exist in
worker processes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from deap import base, creator, tools

from evoquant.config import SearchConfig
from evoquant.search.genome import Genome, Payload, SearchSpace
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


def evolve(
    space: SearchSpace,
    evaluate: Callable[[Payload], float],
    config: SearchConfig,
    *,
    map_function: Callable[[Callable, Iterable], Iterable[float]] = map,
    callback: Callable[[GenerationStats], bool | None] | None = None,
) -> SearchResult:
    """Run the strategy from the starting model (the empty genome) and return the best genome found.

    Each generation makes ``lambda_`` offspring from the current ``mu`` parents (crossover with probability
    ``crossover_probability``, then always a mutation), evaluates only offspring not seen before, and keeps
    the best ``mu`` of parents and offspring (elitism: the best never gets worse). ``callback`` receives each
    generation's stats and may return True to stop. With a fixed ``config.seed`` and a deterministic
    ``evaluate`` the result is identical from run to run, whatever ``map_function`` runs it.
    """
    rng = np.random.default_rng(config.seed)
    step = StepSize(config)
    toolbox = make_toolbox(space, config, rng, evaluate, map_function, step)
    termination = Termination(config)
    seen: dict[tuple, float] = {}
    evaluations = 0

    def assess(individuals: list) -> None:
        nonlocal evaluations
        fresh = [ind for ind in individuals if not ind.fitness.valid and ind.key() not in seen]
        unique = list({ind.key(): ind for ind in fresh}.values())
        values = list(toolbox.map(toolbox.evaluate, [ind.payload() for ind in unique]))
        evaluations += len(unique)
        for ind, value in zip(unique, values):
            seen[ind.key()] = float(value)
        for ind in individuals:
            if not ind.fitness.valid:
                ind.fitness.values = (seen[ind.key()],)

    start = creator.EvoquantIndividual()
    assess([start])
    population = [start]
    start_fitness = start.fitness.values[0]
    termination.update(start_fitness)
    history: list[GenerationStats] = []
    generation = 0
    stop_reason = termination.reason(generation, evaluations)
    while stop_reason is None:
        generation += 1
        offspring = _generation(toolbox, population, rng, config, space)
        assess(offspring)
        parent_best = population[0].fitness.values[0]
        step.update(float(np.mean([ind.fitness.values[0] < parent_best for ind in offspring])))
        population = toolbox.select(population + offspring, config.mu)
        best = population[0]
        termination.update(best.fitness.values[0])
        stats = GenerationStats(
            generation=generation,
            evaluations=evaluations,
            best=best.fitness.values[0],
            mean=float(np.mean([ind.fitness.values[0] for ind in offspring])),
            best_shifts=best.n_shifts,
            mutation_fraction=step.fraction,
            elapsed=termination.elapsed(),
            progress=termination.progress(generation, evaluations),
        )
        history.append(stats)
        if callback is not None and callback(stats):
            stop_reason = "callback"
            break
        stop_reason = termination.reason(generation, evaluations)
    best = population[0]
    return SearchResult(
        best=Genome(best.shifts),
        best_fitness=best.fitness.values[0],
        start_fitness=start_fitness,
        evaluations=evaluations,
        stop_reason=stop_reason,
        history=history,
        elapsed=termination.elapsed(),
    )


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
