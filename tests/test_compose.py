"""The compose stage: the per-layer choice among fits (the search alone, on a known optimum), its
settings, and the stage inside refine."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from evoquant.config import ComposeConfig, RefineConfig
from evoquant.errors import EvoquantError
from evoquant.search.compose import compose, mutate_choices


def _separable(costs: np.ndarray, calls: list):
    """Fitness = Σ layer cost of its fit; records every genome scored."""

    def evaluate_many(genomes):
        calls.extend(tuple(g) for g in genomes)
        return [float(costs[np.arange(len(g)), g].sum()) for g in genomes]

    return evaluate_many


def test_compose_finds_the_best_fit_of_every_layer_and_scores_no_genome_twice():
    rng = np.random.default_rng(0)
    costs = rng.uniform(size=(12, 3))  # 12 layers, fits 0..2, the best fit differs from layer to layer
    calls: list = []
    result = compose(3, 12, _separable(costs, calls), ComposeConfig(generations=200, patience=None), seed=1)
    assert np.array_equal(result.best, costs.argmin(axis=1))
    assert result.best_fitness == pytest.approx(costs.min(axis=1).sum())
    assert len(calls) == len(set(calls)) == result.evaluations
    # every uniform genome is scored first, the reconstruction's (fit 1) first of all
    assert calls[:3] == [(1,) * 12, (0,) * 12, (2,) * 12]
    assert result.uniform_fitness == pytest.approx([costs[:, k].sum() for k in range(3)])
    assert [h.best for h in result.history] == sorted((h.best for h in result.history), reverse=True)


def test_equivalent_fits_are_one_model_and_never_scored_twice():
    from evoquant.search.compose import canonical_fits

    rng = np.random.default_rng(4)
    start = [rng.integers(-8, 8, size=5) for _ in range(10)]
    # fit 2 skipped every layer but 3 (the start's states there); fit 1 left layer 0 as it was
    states = [[w, w + 1 if layer else w.copy(), w - 1 if layer == 3 else w.copy()] for layer, w in enumerate(start)]
    canonical = canonical_fits(states)
    assert canonical[0].tolist() == [0, 0, 0] and canonical[3].tolist() == [0, 1, 2] and canonical[5].tolist() == [0, 1, 0]
    costs = rng.uniform(size=(10, 3))
    costs[np.arange(10), 2] = np.where(np.arange(10) == 3, costs[3, 2], costs[:, 0])  # a model's cost follows its states
    costs[0, 1] = costs[0, 0]
    models: list = []

    def evaluate_many(genomes):
        models.extend(tuple(tuple(states[layer][fit]) for layer, fit in enumerate(g)) for g in genomes)
        return [float(costs[np.arange(10), g].sum()) for g in genomes]

    result = compose(3, 10, evaluate_many, ComposeConfig(generations=60, patience=None, scout_generations=0), seed=0, canonical=canonical)
    assert len(models) == len(set(models)) == result.evaluations  # no model compiled twice under two genomes
    assert result.best_fitness == pytest.approx(costs.min(axis=1).sum())
    assert all(canonical[layer, fit] == fit for layer, fit in enumerate(result.best))
    assert result.uniform_fitness[2] == pytest.approx(costs[np.arange(10), canonical[np.arange(10), 2]].sum())


def test_compose_keeps_the_reconstruction_on_ties_and_stops_on_its_budget():
    costs = np.zeros((5, 3))  # every genome scores the same: nothing beats the reconstruction
    result = compose(3, 5, _separable(costs, []), ComposeConfig(max_evaluations=20, patience=None), seed=0)
    assert np.array_equal(result.best, np.ones(5)) and result.stop_reason == "evaluations"
    assert result.evaluations <= 20


def test_a_search_that_finds_nothing_stops_after_its_scout_generations():
    # every non-uniform genome is 1 % better than the best uniform one: less than the 2 % scouting asks
    costs = np.zeros((6, 3))

    def evaluate_many(genomes):
        return [1.0 if len(set(g)) == 1 else 0.99 for g in genomes]

    result = compose(3, 6, evaluate_many, ComposeConfig(generations=50, patience=None, scout_generations=4, scout_gain=0.02), seed=0)
    assert result.stop_reason == "no gain" and len(result.history) - 1 == 4 and result.evaluations <= 3 + 4 * 8
    assert result.best_fitness == 0.99  # what it found is still kept; verification decides whether it is worth writing
    # a 2 % gain is enough to go on; scout_generations 0 never stops this way
    kept_on = compose(3, 6, lambda genomes: [1.0 if len(set(g)) == 1 else 0.98 for g in genomes], ComposeConfig(generations=6, patience=None), seed=0)
    assert kept_on.stop_reason == "generations"
    never = compose(3, 6, _separable(costs, []), ComposeConfig(generations=6, patience=None, scout_generations=0), seed=0)
    assert never.stop_reason == "generations"


def test_a_gain_that_verification_does_not_confirm_stops_the_search_after_scouting():
    # on the selection images even layers want fit 2 and odd ones fit 0: compositions beat every uniform genome;
    # the other images (verify) reward fit 1 everywhere, then fit 0, then fit 2: what selection gains they lose
    costs = np.tile([[1.0, 1.0, 0.5], [0.5, 1.0, 1.0]], (3, 1))
    elsewhere = np.array([0.5, 0.0, 1.0])
    verified: list = []

    def disagrees(genomes):
        verified.extend(tuple(g) for g in genomes)
        return [float(elsewhere[g].sum()) for g in genomes]

    config = ComposeConfig(generations=30, patience=None, scout_generations=3)
    stopped = compose(3, 6, _separable(costs, []), config, seed=0, verify=disagrees)
    assert stopped.stop_reason == "not verified" and len(stopped.history) - 1 == 3
    assert stopped.best_fitness < min(stopped.uniform_fitness)  # what it found is kept: verification at the end decides
    # checked once: the best genome against the best uniform one on the selection images (fit 0: ties keep the first)
    assert len(verified) == 2 and verified[1] == (0,) * 6
    assert stopped.scout_check == {"generation": 3, "best": float(elsewhere[stopped.best].sum()), "uniform": 3.0}
    # where verification agrees, the search goes on to its budget, checked only once
    agreeing: list = []

    def agrees(genomes):
        agreeing.extend(genomes)
        return [float(costs[np.arange(6), g].sum()) for g in genomes]

    kept_on = compose(3, 6, _separable(costs, []), config, seed=0, verify=agrees)
    assert kept_on.stop_reason == "generations" and len(agreeing) == 2 and kept_on.scout_check["best"] < kept_on.scout_check["uniform"]
    # scout_verify off: no check at all
    off = compose(3, 6, _separable(costs, []), ComposeConfig(generations=30, patience=None, scout_generations=3, scout_verify=False), seed=0, verify=disagrees)
    assert off.stop_reason == "generations" and off.scout_check is None


def test_gains_below_min_improvement_do_not_keep_a_search_going():
    # every layer moved to fit 2 gains 0.04 %: the search keeps improving, by less than 1 % in all
    def evaluate_many(genomes):
        return [1.0 if len(set(g)) == 1 else 0.999 - 0.0004 * int(np.count_nonzero(g == 2)) for g in genomes]

    settings = {"generations": 40, "patience": 3, "scout_generations": 0}
    assert ComposeConfig().min_improvement == 0.01
    stopped = compose(3, 20, evaluate_many, ComposeConfig(**settings), seed=0)
    assert stopped.stop_reason == "converged" and len(stopped.history) - 1 == 3
    assert stopped.best_fitness < 1.0  # what it found is kept
    # every gain counting, the same search goes on past those generations
    patient = compose(3, 20, evaluate_many, ComposeConfig(**settings, min_improvement=1e-4), seed=0)
    assert len(patient.history) - 1 > 3 and patient.evaluations > stopped.evaluations and patient.best_fitness <= stopped.best_fitness


def test_compose_is_reproducible_for_a_seed():
    costs = np.random.default_rng(3).uniform(size=(8, 2))
    first = compose(2, 8, _separable(costs, []), ComposeConfig(generations=3, patience=None), seed=5)
    again = compose(2, 8, _separable(costs, []), ComposeConfig(generations=3, patience=None), seed=5)
    assert np.array_equal(first.best, again.best) and first.evaluations == again.evaluations


def _racing(costs: np.ndarray, calls: list, bounds: list, noise: float):
    """Racing over the separable problem: the subset score is the full one plus seeded noise of relative
    size ``noise``; records every genome scored and every bound."""
    rng = np.random.default_rng(9)

    def race(genomes, bound):
        bounds.append(bound)
        results = []
        for genome in genomes:
            calls.append(tuple(genome))
            full = float(costs[np.arange(len(genome)), genome].sum())
            subset = full * (1 + noise * rng.standard_normal())
            results.append((None if subset > bound else full, subset))
        return results

    return race


def test_racing_stops_losers_on_the_subset_and_still_finds_the_optimum():
    costs = np.random.default_rng(0).uniform(size=(12, 3))
    calls, bounds = [], []
    config = ComposeConfig(generations=200, patience=None, race_margin=0.05)
    result = compose(3, 12, _separable(costs, []), config, seed=1, race=_racing(costs, calls, bounds, noise=0.01))
    assert np.array_equal(result.best, costs.argmin(axis=1)) and np.isfinite(result.best_fitness)
    assert 0 < result.raced < result.evaluations == len(calls) == len(set(calls))  # a stopped genome is never scored again
    assert bounds[0] == np.inf and all(np.isfinite(bound) for bound in bounds[1:])  # the uniform genomes are never raced
    # a looser margin stops fewer
    looser = compose(3, 12, _separable(costs, []), dataclasses.replace(config, race_margin=1.0), seed=1, race=_racing(costs, [], [], noise=0.01))
    assert looser.raced < result.raced


def test_the_bound_is_the_worst_parents_subset_score_with_the_margin():
    costs = np.random.default_rng(1).uniform(size=(6, 2))
    finished: list[float] = []  # full scores of the genomes not stopped (the parents are the best two of them)
    checked = []

    def race(genomes, bound):
        if finished:
            worst_parent = sorted(finished)[1]
            checked.append(bound == pytest.approx(2 * worst_parent * 1.1))  # subset score: twice the full one
        results = []
        for genome in genomes:
            full = float(costs[np.arange(6), genome].sum())
            stopped = 2 * full > bound
            results.append((None if stopped else full, 2 * full))
            if not stopped:
                finished.append(full)
        return results

    compose(2, 6, _separable(costs, []), ComposeConfig(generations=5, patience=None, mu=2, race_margin=0.1), seed=0, race=race)
    assert len(checked) == 5 and all(checked)


@pytest.mark.parametrize("segment_probability", [0.0, 1.0])
def test_a_mutation_always_changes_the_genome(segment_probability):
    rng = np.random.default_rng(0)
    for _ in range(200):
        genome = list(rng.integers(0, 3, size=6))
        child = mutate_choices(list(genome), 3, rng, segment_probability)
        changed = np.flatnonzero(np.asarray(child) != np.asarray(genome))
        assert changed.size >= 1 and all(0 <= gene < 3 for gene in child)
        if segment_probability == 0.0:
            assert changed.size == 1
        else:  # one run of consecutive layers, now all one fit (or a single layer moved)
            run = child[changed[0] : changed[-1] + 1]
            assert len(set(run)) == 1 or changed.size == 1


def test_compose_settings_are_checked_and_read_from_yaml(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("stages: reconstruct,compose\ncompose:\n  fits: [{inputs: fp32}, {damping: 0.1}]\n  lambda: 6\n  images: 256\n")
    config = RefineConfig.from_yaml(path)
    assert config.stages == ("reconstruct", "compose")
    assert config.compose.fits == ({"inputs": "fp32"}, {"damping": 0.1}) and config.compose.lambda_ == 6 and config.compose.images == 256
    assert RefineConfig.from_dict(config.to_dict()).compose == config.compose
    for bad, message in (("compose:\n  fits: [{colour: red}]\n", "unknown reconstruct setting"),
                         ("compose:\n  fits: [{damping: -1}]\n", "damping"),
                         ("compose:\n  fits: {inputs: fp32}\n", "compose.fits"),
                         ("compose:\n  segment_probability: 2\n", "segment_probability"),
                         ("compose:\n  scout_gain: 1.5\n", "scout_gain"),
                         ("compose:\n  scout_generations: -1\n", "scout_generations"),
                         ("compose:\n  scout_verify: sometimes\n", "scout_verify"),
                         ("compose:\n  speed: 3\n", "unknown setting")):
        path.write_text(bad)
        with pytest.raises(EvoquantError, match=message):
            RefineConfig.from_yaml(path)


def _small_config(**compose):
    return RefineConfig().replace(selection_size=64, verification_size=64, selection_pool=128, engine="plain", progress=False,
                                  search={"generations": 2}, compose={"generations": 3, "images": 64, **compose})


def test_refine_runs_compose_between_reconstruct_and_evolve(tiny_irs, tmp_path):
    from evoquant import refine

    result = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "out.xml",
                    stages="evolve,compose,reconstruct", config=_small_config())
    assert [stage.name for stage in result.stages] == ["reconstruct", "compose", "evolve"]  # pipeline order, whatever the listing
    reconstruct_stage, compose_stage, _ = result.stages
    details = compose_stage.details
    assert details["fits"] == ["start", "reconstruct", "inputs=fp32"]
    assert sum(details["layers_per_fit"].values()) == len(details["layers"]) == len(reconstruct_stage.details["layers"])
    assert details["selection_after"] <= details["selection_before"] == details["uniform_selection"]["reconstruct"]
    assert details["evaluations"] >= 3 and len(details["fit_seconds"]) == 1
    report = json.loads(json.dumps(result.to_dict()))
    assert [stage["name"] for stage in report["stages"]] == ["reconstruct", "compose", "evolve"]
    assert result.verification_after.fitness <= result.verification_before.fitness


def test_compose_needs_the_reconstruct_stage(tiny_irs):
    from evoquant import refine

    with pytest.raises(EvoquantError, match="reconstruct,compose"):
        refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="compose,evolve", config=_small_config())
    with pytest.raises(EvoquantError, match="--reference"):
        refine(tiny_irs.int8, data=str(tiny_irs.data), objective="mse", stages="reconstruct,compose", config=_small_config())


def test_a_compose_without_alternatives_chooses_between_start_and_reconstruction(tiny_irs):
    from evoquant import refine

    result = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose", config=_small_config(fits=()))
    details = result.stages[1].details
    assert details["fits"] == ["start", "reconstruct"] and details["fit_seconds"] == []
    assert set(details["layers"].values()) <= {"start", "reconstruct"}


def test_a_finished_compose_is_taken_from_the_run_directory(tiny_irs, tmp_path):
    from evoquant import refine

    run_dir = tmp_path / "run"
    first = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "a.xml", stages="reconstruct,compose",
                   config=_small_config(), run_dir=run_dir)
    assert (run_dir / "compose.npz").is_file()
    again = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "b.xml", stages="reconstruct,compose",
                   config=_small_config(), run_dir=run_dir)
    assert again.stages[1].details["layers"] == first.stages[1].details["layers"]
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()


def test_workers_without_the_evolve_stage_are_not_ignored_silently(tiny_irs):
    from evoquant import EvoquantWarning, refine

    with pytest.warns(EvoquantWarning, match="compose scores its candidates in this process"):
        refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose", config=_small_config().replace(jobs=2))


def test_an_evaluator_races_on_the_first_images(tiny_irs):
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    images = np.ascontiguousarray(np.load(tiny_irs.data)["x"][:64])
    teacher = infer(compile_ir(read_ir(tiny_irs.fp32), f32=True), images)
    weights = np.random.default_rng(0).uniform(0.5, 1.5, size=64)
    evaluator = PlainEvaluator(FitnessContext(str(tiny_irs.int8), images, teacher, None, "kl", weights=weights))
    outputs = evaluator.outputs({})
    full, early = evaluator.race({}, 16, np.inf)
    assert full == pytest.approx(evaluator({})) and early == pytest.approx(evaluator.score([o[:16] for o in outputs], 16))
    assert early != pytest.approx(full)  # the subset is scored on its own images and weights
    assert evaluator.race({}, 16, early * 0.99) == (None, pytest.approx(early))  # worse than the bound: stops there


def test_refine_races_compose_children_on_a_subset(tiny_irs):
    from evoquant import refine

    result = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose", config=_small_config(race_images=16, race_margin=0.0))
    details = result.stages[1].details
    assert details["race_images"] == 16 and 0 <= details["raced"] < details["evaluations"]
    assert f"{details['raced']} stopped after 16 images" in result.table()
    unraced = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose", config=_small_config(race_images=0))
    assert unraced.stages[1].details["race_images"] == 0 and unraced.stages[1].details["raced"] == 0
    assert "stopped after" not in unraced.table()


def test_compiling_ahead_scores_candidates_as_one_at_a_time_does(tiny_irs):
    from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.weights import find_quantized_weights

    images = np.ascontiguousarray(np.load(tiny_irs.data)["x"][:64])
    teacher = infer(compile_ir(read_ir(tiny_irs.fp32), f32=True), images)
    evaluator = PlainEvaluator(FitnessContext(str(tiny_irs.int8), images, teacher, None, "kl"))
    weight = find_quantized_weights(read_ir(tiny_irs.int8))[0]
    inside = np.flatnonzero((weight.states.reshape(-1) > weight.low) & (weight.states.reshape(-1) < weight.high))
    rng = np.random.default_rng(2)
    payloads = [{}] + [{0: (np.sort(rng.choice(inside, 5, replace=False)), rng.choice([-1, 1], 5).astype(np.int8))} for _ in range(3)]
    one_by_one = [evaluator.race(payload, 16, np.inf) for payload in payloads]
    assert evaluator.race_many(payloads, 16, np.inf, compile_ahead=True) == one_by_one
    assert len({full for full, _ in one_by_one}) > 1
    # undecided: the first candidate is timed, the decision kept for the evaluator's later calls, scores unchanged
    assert evaluator.compile_ahead is None
    assert evaluator.race_many(payloads, 16, np.inf) == one_by_one
    assert isinstance(evaluator.compile_ahead, bool)
    decided = evaluator.compile_ahead
    assert evaluator.race_many(payloads[1:], 16, np.inf) == one_by_one[1:] and evaluator.compile_ahead is decided


def test_the_evaluator_times_its_batch_sizes_on_the_first_candidates_and_scores_do_not_depend_on_them(tiny_irs):
    from evoquant.fitness.evaluator import BATCH_TRIALS, FitnessContext, PlainEvaluator
    from evoquant.ir.runtime import BATCH_SIZES, compile_ir, infer, read_ir

    images = np.ascontiguousarray(np.load(tiny_irs.data)["x"][:300])
    teacher = infer(compile_ir(read_ir(tiny_irs.fp32), f32=True), images)
    evaluator = PlainEvaluator(FitnessContext(str(tiny_irs.int8), images, teacher, None, "kl"))
    reference = evaluator({})  # batches of the first size, undecided
    results = [evaluator.race({}, 150, np.inf) for _ in range(BATCH_TRIALS)]  # two timed calls each (head, tail)
    assert evaluator.batch_size in BATCH_SIZES and all(len(times) == BATCH_TRIALS for times in evaluator._batch_trials.values())
    assert all(full == reference for full, _ in results) and len({early for _, early in results}) == 1
    for size in (*BATCH_SIZES, 7):  # 7: batches that do not divide the images
        evaluator.batch_size = size
        assert evaluator({}) == reference and evaluator.race({}, 150, np.inf) == results[0]
    # too few images to time: the first size, undecided
    small = PlainEvaluator(FitnessContext(str(tiny_irs.int8), images[:100], [t[:100] for t in teacher], None, "kl"))
    small.race({}, 50, np.inf)
    assert small.batch_size is None and not any(small._batch_trials.values())


def test_refine_reports_a_compose_search_stopped_after_scouting(tiny_irs):
    from evoquant import refine

    # a 99 % gain is never found: the search stops after its one scouting generation, and says so
    result = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose",
                    config=_small_config(scout_generations=1, scout_gain=0.99))
    details = result.stages[1].details
    assert details["stop_reason"] == "no gain" and details["generations"] == 1
    assert "stopped: no better composition in the first generations" in result.table()


def test_refine_scouting_check_scores_genomes_on_the_verification_images(tiny_irs, monkeypatch):
    from evoquant import refine
    from evoquant.search import compose as compose_module

    real_compose, checked = compose_module.compose, {}

    def recording(fits, layers, *args, verify=None, **kwargs):
        checked["start"], checked["reconstruct"] = verify([np.zeros(layers, dtype=np.int64), np.ones(layers, dtype=np.int64)])
        return real_compose(fits, layers, *args, verify=verify, **kwargs)

    monkeypatch.setattr(compose_module, "compose", recording)
    result = refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), stages="reconstruct,compose", config=_small_config())
    # the uniform genomes score as the start and the reconstruction do at the final gate
    assert checked["start"] == pytest.approx(result.verification_before.fitness, rel=1e-6)
    assert checked["reconstruct"] == pytest.approx(result.stages[0].verification.fitness, rel=1e-6)
    assert "scout_check" in result.stages[1].details
