"""Which fit each layer takes: a (mu + lambda) evolution strategy over one choice per layer.

The reconstruct stage fits each layer one way; other reconstruct settings (the reference's own layer
inputs, more damping) fit it other ways, and the starting states are a fit too. Which layer should take
which fit is an end-to-end question the layer-wise solve cannot answer: compensations that help every
layer alone can compound through the network (docs/reconstruct.md, MobileNetV3-small at W8A8). Here a
genome is one small integer per layer, the index of its fit, and the objective is the end-to-end one.
A genome has tens of genes where the weight search has millions, so what it finds on a few hundred
synthetic images has far fewer ways to fit them by chance.

Operators: uniform crossover; a mutation either gives one layer another fit or gives a run of
consecutive layers (in graph order) one fit, since compounding follows the graph. The first population
is every uniform genome (all layers the same fit: the start, the reconstruction, each alternative).
The search never sees OpenVINO: ``evaluate_many`` maps genomes (numpy int arrays) to fitness values.

Stopping early: a search whose first ``scout_generations`` find no genome better than the best uniform
one by ``scout_gain`` stops there ("no gain"): on the zoo, what a search found after such a start moved
the synthetic objective by a few percent and did not carry over to held-out data (docs/reconstruct.md).

With ``verify`` (a function scoring genomes on other images: refine passes the verification images,
whose verdict decides in the end), a search that did find ``scout_gain`` by then checks that its best
genome also beats the best uniform one there; if it does not, the composition would be rejected at the
end, and the search stops ("not verified"). The check's two scores are kept (``scout_check``).

Equivalent fits: where two fits give a layer the same states (a fit that skipped the layer leaves it at
the start's), genomes that differ only there are one model. With ``canonical`` every genome is rewritten
to the lowest fit index with the same states per layer before it is looked up or scored, so no model is
compiled twice under two names and the search's budget goes to models it has not seen.

Racing: a child enters the parents only if it beats the worst of them, and a child differs from its
parents in a few layers, so its score on a subset of the images already says, most of the time, that it
will not. With ``race``, every genome is first scored on the subset; a child whose subset score exceeds
the worst parent's by more than ``race_margin`` stops there (its fitness is +inf: never selected, never
scored again), so a loser costs its compile and a fraction of the images.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from deap import base, creator, tools

from evoquant.config import ComposeConfig
from evoquant.search.strategy import GenerationStats, Termination

if not hasattr(creator, "EvoquantComposition"):
    if not hasattr(creator, "EvoquantFitness"):
        creator.create("EvoquantFitness", base.Fitness, weights=(-1.0,))
    creator.create("EvoquantComposition", list, fitness=creator.EvoquantFitness)


@dataclass
class ComposeResult:
    """The best genome (a fit index per layer), its fitness, and the uniform genomes' fitness by fit."""

    best: np.ndarray
    best_fitness: float
    uniform_fitness: list[float]  # all layers fit k, for each fit k (0: the start)
    evaluations: int
    stop_reason: str
    raced: int = 0  # genomes stopped on the racing subset
    scout_check: dict | None = None  # at the scouting generation, with verify: the best and the best uniform genome's verify scores
    history: list[GenerationStats] = field(default_factory=list)
    elapsed: float = 0.0


def mutate_choices(genome: list, fits: int, rng: np.random.Generator, segment_probability: float) -> list:
    """Give one layer another fit, or (with ``segment_probability``) a run of consecutive layers one fit."""
    layers = len(genome)
    if layers == 0 or fits < 2:
        return genome
    if rng.random() < segment_probability:
        first = int(rng.integers(layers))
        last = int(rng.integers(first, layers)) + 1
        fit = int(rng.integers(fits))
        if all(gene == fit for gene in genome[first:last]):  # a no-op run: move its first layer instead
            genome[first] = int((fit + rng.integers(1, fits)) % fits)
        else:
            genome[first:last] = [fit] * (last - first)
        return genome
    layer = int(rng.integers(layers))
    genome[layer] = int((genome[layer] + rng.integers(1, fits)) % fits)
    return genome


#: ``race(genomes, bound)``: per genome, (its fitness, or None when its score on the racing subset exceeds
#: ``bound``; that subset score).
Race = Callable[[Sequence[np.ndarray], float], Sequence[tuple[float | None, float]]]


def canonical_fits(states: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """``states[layer][fit]``, each fit's states for each layer: per (layer, fit), the lowest fit index whose
    states for that layer are the same array values."""
    table = np.zeros((len(states), len(states[0]) if states else 0), dtype=np.int64)
    for layer, options in enumerate(states):
        for fit, value in enumerate(options):
            table[layer, fit] = next(other for other in range(fit + 1) if other == fit or np.array_equal(options[other], value))
    return table


def compose(fits: int, layers: int, evaluate_many: Callable[[Sequence[np.ndarray]], Sequence[float]], config: ComposeConfig, *,
            seed: int = 0, callback: Callable[[GenerationStats], bool | None] | None = None, race: Race | None = None,
            canonical: np.ndarray | None = None, verify: Callable[[Sequence[np.ndarray]], Sequence[float]] | None = None) -> ComposeResult:
    """Search one fit index in ``[0, fits)`` per layer (``layers`` genes) for the lowest fitness.

    ``evaluate_many`` scores a list of genomes; genomes already scored are never scored again. Stops on
    ``config``'s budgets (generations, evaluations, time) or patience; ``callback`` gets each
    generation's stats and may return True to stop. Ties keep the earlier genome, so fit 1 (the
    reconstruction) wins over an alternative that scores the same. With ``race``, genomes are scored
    through it instead (see the module's docstring). ``canonical`` (layers x fits, from
    :func:`canonical_fits`) names equivalent fits: every genome is rewritten to its canonical form.
    ``verify`` scores genomes on other images for the scouting check (``config.scout_verify``).
    """
    rows = np.arange(layers)

    def canon(genome: list) -> list:
        if canonical is not None:
            genome[:] = canonical[rows, np.asarray(genome, dtype=np.int64)].tolist()
        return genome

    started = time.perf_counter()
    rng = np.random.default_rng([seed, 7])
    termination = Termination(config)
    toolbox = base.Toolbox()
    toolbox.register("mate", _cross_uniform, rng=rng)
    toolbox.register("mutate", mutate_choices, fits=fits, rng=rng, segment_probability=config.segment_probability)
    toolbox.register("select", tools.selBest)
    seen: dict[tuple, float] = {}
    early: dict[tuple, float] = {}  # scores on the racing subset
    evaluations = raced = 0

    def score(individuals: list, bound: float = math.inf) -> None:
        nonlocal evaluations, raced
        fresh = [ind for ind in dict.fromkeys(tuple(ind) for ind in individuals) if ind not in seen]
        if fresh:
            genomes = [np.asarray(key, dtype=np.int64) for key in fresh]
            results = [(float(value), None) for value in evaluate_many(genomes)] if race is None else race(genomes, bound)
            for key, (value, subset) in zip(fresh, results):
                seen[key] = math.inf if value is None else float(value)
                raced += value is None
                if subset is not None:
                    early[key] = float(subset)
            evaluations += len(fresh)
        for ind in individuals:
            ind.fitness.values = (seen[tuple(ind)],)

    # every uniform genome; the reconstruction's (fit 1) first among equals
    order = [1, 0, *range(2, fits)] if fits > 1 else [0]
    population = [canon(creator.EvoquantComposition([fit] * layers)) for fit in order]
    score(population)
    uniform = [seen[tuple(canon([fit] * layers))] for fit in range(fits)]
    parents = _best(population, config.mu)
    termination.update(parents[0].fitness.values[0])
    history: list[GenerationStats] = []
    scout_check = None
    generation = 0
    while True:
        stats = GenerationStats(generation, evaluations, parents[0].fitness.values[0], float(np.mean([p.fitness.values[0] for p in parents])),
                                int(np.count_nonzero(np.asarray(parents[0]) != 1)), 0.0, termination.elapsed(), termination.progress(generation, evaluations))
        history.append(stats)
        if callback is not None and callback(stats):
            reason = "callback"
            break
        reason = termination.reason(generation, evaluations)
        if reason is None and config.scout_generations and generation >= config.scout_generations:
            if stats.best >= (1.0 - config.scout_gain) * min(uniform):
                reason = "no gain"  # the first generations found nothing worth the rest of the budget
            elif scout_check is None and verify is not None and config.scout_verify:
                best_uniform = canon([int(np.argmin(uniform))] * layers)
                found, level = (float(value) for value in verify([np.asarray(parents[0], dtype=np.int64), np.asarray(best_uniform, dtype=np.int64)]))
                scout_check = {"generation": generation, "best": found, "uniform": level}
                if not found < level:
                    reason = "not verified"  # what it found does not carry over: verification would reject it
        if reason is not None or layers == 0 or fits < 2:
            reason = reason or "nothing to choose"
            break
        offspring = []
        for _ in range(config.lambda_):
            for _attempt in range(20):  # a child not scored before, when one can be found
                child = creator.EvoquantComposition(parents[int(rng.integers(len(parents)))])
                if len(parents) > 1 and rng.random() < config.crossover_probability:
                    child = toolbox.mate(child, parents[int(rng.integers(len(parents)))])
                canon(toolbox.mutate(child))
                if tuple(child) not in seen:
                    break
            offspring.append(child)
        bound = math.inf
        if race is not None:  # a child must beat the worst parent to enter: on the subset, with a margin
            bound = max(early.get(tuple(p), math.inf) for p in parents) * (1.0 + config.race_margin)
        score(offspring, bound)
        parents = _best(parents + offspring, config.mu)
        termination.update(parents[0].fitness.values[0])
        generation += 1
    best = parents[0]
    return ComposeResult(np.asarray(best, dtype=np.int64), best.fitness.values[0], uniform, evaluations, reason,
                         raced=raced, history=history, elapsed=time.perf_counter() - started, scout_check=scout_check)


def _best(individuals: list, mu: int) -> list:
    """The ``mu`` best distinct genomes (DEAP's selBest sorts stably: ties keep the earlier)."""
    distinct, keys = [], set()
    for ind in individuals:
        if tuple(ind) not in keys:
            keys.add(tuple(ind))
            distinct.append(ind)
    return tools.selBest(distinct, min(mu, len(distinct)))


def _cross_uniform(child: list, other: Sequence[int], rng: np.random.Generator) -> list:
    """Each gene from ``other`` with probability 1/2 (in place on ``child``)."""
    for layer in np.flatnonzero(rng.random(len(child)) < 0.5):
        child[layer] = other[layer]
    return child
