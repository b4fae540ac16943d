"""The evolution strategy on pure-numpy problems: bounds, sparsity, tie flips, determinism, budgets."""

from __future__ import annotations

import numpy as np
import pytest

from evoquant.config import SearchConfig
from evoquant.search.genome import Genome, SearchSpace, TensorSpace, apply_shifts, shifts_between
from evoquant.search.operators import crossover_tensorwise, mutate_random, mutate_tie, tie_pools
from evoquant.search.strategy import evolve


def make_space(max_shift: int = 1, residuals: bool = False, seed: int = 0) -> SearchSpace:
    rng = np.random.default_rng(seed)
    tensors = []
    for size, (low, high) in [(50, (-63, 63)), (400, (-127, 127)), (30, (0, 15))]:
        states = rng.integers(low, high + 1, size=size).astype(np.int32)
        states[:5] = low  # states sitting on the bounds must never be pushed past them
        states[5:10] = high
        residual = rng.uniform(-0.5, 0.5, size=size) if residuals else None
        tensors.append(TensorSpace(f"t{len(tensors)}", states, low, high, residual))
    return SearchSpace(tuple(tensors), max_shift=max_shift)


def assert_within_bounds(genome: Genome, space: SearchSpace) -> None:
    for tensor, (indices, deltas) in genome.shifts.items():
        spec = space.tensors[tensor]
        assert np.all(np.diff(indices) > 0), "indices sorted and unique"
        assert np.all(deltas != 0), "no zero deltas are stored"
        assert np.abs(deltas).max() <= space.max_shift
        shifted = apply_shifts(spec.states, indices, deltas)
        assert shifted.min() >= spec.low and shifted.max() <= spec.high


@pytest.mark.parametrize("max_shift", [1, 2])
def test_mutations_never_leave_bounds_or_max_shift(max_shift):
    space = make_space(max_shift=max_shift, residuals=True)
    pools = tie_pools(space, 0.2)
    rng = np.random.default_rng(3)
    genome = Genome()
    for step in range(300):
        if step % 2:
            genome = mutate_random(genome, space, rng, fraction=0.2, tensors=2, step=1 + step % 3)
        else:
            genome = mutate_tie(genome, space, rng, fraction=0.2, tensors=2, pools=pools)
        assert_within_bounds(genome, space)
    assert genome.n_shifts > 0


def test_mutation_is_sparse_and_leaves_parent_untouched():
    space = make_space()
    rng = np.random.default_rng(0)
    parent = mutate_random(Genome(), space, rng, fraction=0.01, tensors=1)
    snapshot = parent.key()
    child = mutate_random(parent, space, rng, fraction=0.01, tensors=1)
    assert parent.key() == snapshot
    assert 1 <= child.n_shifts <= parent.n_shifts + 4  # 1% of at most 400 weights
    for indices, deltas in child.payload().values():
        assert indices.dtype == np.int64 and deltas.dtype == np.int8


def test_tie_flip_moves_toward_the_residual_and_back():
    states = np.zeros(20, dtype=np.int32)
    residual = np.linspace(-0.49, 0.49, 20)
    space = SearchSpace((TensorSpace("t", states, -127, 127, residual),))
    pools = tie_pools(space, 0.1)  # the two weights closest to a tie: residual ±0.49
    assert sorted(pools[0].tolist()) == [0, 19]
    rng = np.random.default_rng(0)
    flipped = mutate_tie(Genome(), space, rng, fraction=0.1, tensors=1, pools=pools)
    indices, deltas = flipped.shifts[0]
    for index, delta in zip(indices, deltas):
        assert delta == np.sign(residual[index]), "moved to the other neighbour of the exact value"
    back = mutate_tie(flipped, space, np.random.default_rng(0), fraction=0.1, tensors=1, pools=pools)
    assert back.n_shifts == 0, "flipping the same weights again restores nearest rounding"


def test_crossover_takes_whole_tensors_from_parents():
    space = make_space()
    rng = np.random.default_rng(1)
    first = mutate_random(Genome(), space, rng, fraction=0.1, tensors=3)
    second = mutate_random(Genome(), space, rng, fraction=0.1, tensors=3)
    child = crossover_tensorwise(first, second, rng)
    for tensor, (indices, deltas) in child.shifts.items():
        assert any(
            tensor in parent.shifts and np.array_equal(parent.shifts[tensor][0], indices) and np.array_equal(parent.shifts[tensor][1], deltas)
            for parent in (first, second)
        )


def quadratic_fitness(target: dict[int, np.ndarray], space: SearchSpace):
    """Distance of the shifted states to a hidden target: a problem with a known optimum."""

    def evaluate(payload) -> float:
        total = 0.0
        for tensor, spec in enumerate(space.tensors):
            states = spec.states.copy()
            if tensor in payload:
                states = apply_shifts(states, *payload[tensor])
            total += float(np.sum((states - target[tensor]) ** 2))
        return total

    return evaluate


def test_strategy_improves_monotonically_and_is_reproducible():
    space = make_space()
    rng = np.random.default_rng(9)
    target = {i: np.clip(t.states + rng.choice([-1, 0, 1], size=t.size), t.low, t.high) for i, t in enumerate(space.tensors)}
    config = SearchConfig(generations=60, mu=3, lambda_=6, mutation_fraction=0.005, patience=None, seed=11)
    first = evolve(space, quadratic_fitness(target, space), config)
    second = evolve(space, quadratic_fitness(target, space), config)
    assert first.best.key() == second.best.key()
    assert [h.best for h in first.history] == [h.best for h in second.history]
    bests = [first.start_fitness] + [h.best for h in first.history]
    assert all(b2 <= b1 for b1, b2 in zip(bests, bests[1:])), "elitism: the best never gets worse"
    assert first.best_fitness < 0.9 * first.start_fitness
    other_seed = evolve(space, quadratic_fitness(target, space), SearchConfig(**{**config.__dict__, "seed": 12}))
    assert other_seed.best.key() != first.best.key()


def test_budgets_and_callback_stop_the_search():
    space = make_space()
    flat = lambda payload: 1.0  # noqa: E731 - nothing ever improves
    converged = evolve(space, flat, SearchConfig(generations=100, patience=5))
    assert converged.stop_reason == "converged" and len(converged.history) == 5
    budget = evolve(space, lambda p: float(-sum(len(i) for i, _ in p.values())), SearchConfig(generations=100, max_evaluations=30, patience=None, lambda_=8))
    assert budget.stop_reason == "evaluations" and budget.evaluations <= 30
    stopped = evolve(space, flat, SearchConfig(generations=100, patience=None), callback=lambda stats: stats.generation == 3)
    assert stopped.stop_reason == "callback" and len(stopped.history) == 3
    assert 0 < stopped.history[-1].progress <= 1


def test_duplicate_genomes_are_evaluated_once():
    space = SearchSpace((TensorSpace("t", np.zeros(1, dtype=np.int32), -1, 1),))
    calls = []
    result = evolve(space, lambda p: calls.append(1) or 1.0, SearchConfig(generations=5, patience=None, lambda_=8))
    # One weight with states {-1, 0, 1}: only three distinct genomes exist.
    assert len(calls) == result.evaluations <= 3


def _shifted_by_loop(shifts, spec, max_shift, indices, steps):
    """The one-index-at-a-time definition of Genome.shifted, as the oracle for the vectorized one."""
    current = dict(zip(*(arr.tolist() for arr in shifts)))
    for index, step in zip(indices.tolist(), steps.tolist()):
        state = int(spec.states[index])
        delta = max(-max_shift, min(max_shift, current.get(index, 0) + step))
        delta = max(spec.low - state, min(spec.high - state, delta))
        if delta:
            current[index] = delta
        else:
            current.pop(index, None)
    order = sorted(current)
    return order, [current[i] for i in order]


@pytest.mark.parametrize("max_shift", [1, 2])
def test_shifted_matches_its_one_index_at_a_time_definition(max_shift):
    space = make_space(max_shift=max_shift)
    rng = np.random.default_rng(5)
    genome = Genome()
    for _ in range(200):
        tensor = int(rng.integers(len(space.tensors)))
        spec = space.tensors[tensor]
        indices = rng.choice(spec.size, size=int(rng.integers(1, spec.size // 2)), replace=False)
        steps = rng.choice([-2, -1, 1, 2], size=len(indices))
        before = genome.shifts.get(tensor, (np.empty(0, np.int64), np.empty(0, np.int8)))
        expected = _shifted_by_loop(before, spec, max_shift, indices, steps)
        genome.shifted(space, tensor, indices, steps)
        after = genome.shifts.get(tensor, (np.empty(0, np.int64), np.empty(0, np.int8)))
        assert (after[0].tolist(), after[1].tolist()) == expected
        assert after[0].dtype == np.int64 and after[1].dtype == np.int8
    with pytest.raises(ValueError):
        genome.shifted(space, 0, np.array([1, 1]), np.array([1, 1]))


@pytest.mark.parametrize("stop_after", [1, 7, 19])
def test_a_search_continued_from_its_saved_state_ends_as_the_uninterrupted_one(tmp_path, stop_after):
    from evoquant.search.strategy import Search, SearchState

    space = make_space(residuals=True)
    rng = np.random.default_rng(9)
    target = {i: np.clip(t.states + rng.choice([-1, 0, 1], size=t.size), t.low, t.high) for i, t in enumerate(space.tensors)}
    config = SearchConfig(generations=20, mu=3, lambda_=6, mutation_fraction=0.01, tie_probability=0.3, crossover_probability=0.3, patience=5, seed=4)
    whole = evolve(space, quadratic_fitness(target, space), config)

    first = Search(space, quadratic_fitness(target, space), config)
    first.run(generations=stop_after)
    first.state().save(tmp_path / "state.npz")
    resumed = evolve(space, quadratic_fitness(target, space), config, state=SearchState.load(tmp_path / "state.npz"))
    assert resumed.best.key() == whole.best.key()
    assert [(h.best, h.mean, h.evaluations, h.mutation_fraction) for h in resumed.history] == [(h.best, h.mean, h.evaluations, h.mutation_fraction) for h in whole.history]
    assert (resumed.evaluations, resumed.stop_reason) == (whole.evaluations, whole.stop_reason)


def test_migrants_replace_the_worst_parents_only_when_better():
    from evoquant.search.islands import emigrants, receive, ring_migration
    from evoquant.search.strategy import Search

    space = make_space()
    fitness = lambda payload: float(-sum(len(i) for i, _ in payload.values()))  # noqa: E731  more shifts: better
    config = SearchConfig(generations=5, mu=3, lambda_=4, patience=None, seed=1, migrants=2)
    search = Search(space, fitness, config)
    search.run(generations=2)
    state = search.state()
    donor = Search(space, fitness, SearchConfig(generations=5, mu=3, lambda_=4, patience=None, seed=2, mutation_fraction=0.2))
    donor.run(generations=3)
    migrants = emigrants(donor.state(), 2)
    after = receive(state, migrants, config)
    fitnesses = [fitness for _, fitness in after.population]
    assert fitnesses == sorted(fitnesses) and len(fitnesses) == 3
    assert fitnesses[0] == min(migrants[0][1], state.population[0][1]) and fitnesses[-1] <= state.population[-1][1]
    assert receive(after, migrants, config).population == after.population  # a genome already there is not taken twice
    ring = ring_migration([state, donor.state()], config)
    assert ring[0].population[0][1] == min(donor.state().population[0][1], state.population[0][1])


def test_islands_reproduce_whatever_runs_their_epochs():
    """Epochs run one island at a time or all together, in any order: the same result."""
    from evoquant.search.islands import island_config, islands_result, run_islands
    from evoquant.search.strategy import Search

    space = make_space()
    rng = np.random.default_rng(9)
    target = {i: np.clip(t.states + rng.choice([-1, 0, 1], size=t.size), t.low, t.high) for i, t in enumerate(space.tensors)}
    config = SearchConfig(generations=12, mu=3, lambda_=4, patience=None, seed=3, islands=3, migration_interval=4, migrants=1)

    def epoch(items, generations, reverse=False):
        done = {}
        for island, state in (reversed(items) if reverse else items):
            search = Search(space, quadratic_fitness(target, space), island_config(config, island), state=state)
            search.run(generations=generations)
            done[island] = search.state()
        return [done[island] for island, _ in items]

    first, _ = islands_result(run_islands(config, epoch))
    second, island = islands_result(run_islands(config, lambda items, g: epoch(items, g, reverse=True)))
    assert first.best.key() == second.best.key() and first.evaluations == second.evaluations <= 3 * (1 + 12 * 4)
    assert len(first.history) == 12 and first.best_fitness < first.start_fitness
    one = run_islands(SearchConfig(**{**config.__dict__, "islands": 1}), epoch)  # one island is the plain search
    assert one[0].population[0][1] == evolve(space, quadratic_fitness(target, space), config).best_fitness


def test_shifts_between_states_are_what_apply_shifts_undoes():
    rng = np.random.default_rng(0)
    start = rng.integers(-7, 8, size=(4, 3, 2)).astype(np.int8)
    states = np.clip(start + rng.integers(-2, 3, size=start.shape), -7, 7)
    indices, deltas = shifts_between(start, states)
    assert np.all(deltas != 0) and np.all(np.diff(indices) > 0)  # sparse and sorted, as a payload holds them
    assert np.array_equal(apply_shifts(start, indices, deltas), states)
