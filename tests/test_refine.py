"""refine() end to end on tiny NNCF IRs: write-back, reproducibility, parallel equality, hooks, never worse."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import evoquant
from evoquant.config import RefineConfig, SearchConfig
from evoquant.errors import EvoquantError
from evoquant.ir.runtime import read_ir
from evoquant.ir.weights import find_quantized_weights

SMALL = RefineConfig(search=SearchConfig(mu=2, lambda_=4, generations=4, patience=None, mutation_fraction=0.05, seed=3), selection_size=32, verification_size=32, selection_pool=96, progress=False,
                     stages=("reconstruct", "evolve"))  # these tests are about the weight search


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes() + path.with_suffix(".bin").read_bytes()).hexdigest()


def test_refine_writes_a_valid_ir_and_never_touches_the_input(tiny_irs, tmp_path):
    before = digest(tiny_irs.int8)
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data="fractal", output=tmp_path / "out.xml", config=SMALL)
    assert digest(tiny_irs.int8) == before
    assert result.evaluations > 1 and result.generations == 4
    assert result.objective == "kl"
    written = find_quantized_weights(read_ir(tmp_path / "out.xml"))
    start = find_quantized_weights(read_ir(tiny_irs.int8))
    moved = sum(int(np.sum(w.states != s.states)) for w, s in zip(written, start))
    assert moved == result.shifted_weights
    # the search moves weights within ±search.max_shift of its own start, the reconstruction, which is itself
    # within ±reconstruct.max_shift of NNCF's states: two bounds that add up (whether evolve's moves land on
    # weights the reconstruction moved the same way depends on the CPU's arithmetic; on one CPU they do)
    bound = SMALL.reconstruct.max_shift + (SMALL.search.max_shift if result.chosen_stage == "evolve" else 0)
    for w, s in zip(written, start):
        assert np.abs(w.states - s.states).max() <= bound
        assert w.low <= w.states.min() and w.states.max() <= w.high
    if result.improved:
        assert result.verification_after.kl < result.verification_before.kl
    else:
        assert digest(tmp_path / "out.xml") == before
    assert set(result.to_dict()) >= {"verification_before", "verification_after", "evaluations", "history"}
    assert "KL(FP32||INT8)" in result.table()


def test_fixed_seed_reproduces_the_run_and_jobs_do_not_change_it(tiny_irs, tmp_path):
    first = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "a.xml", config=SMALL)
    again = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "b.xml", config=SMALL)
    parallel = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), output=tmp_path / "c.xml", config=SMALL.replace(jobs=2))
    assert [h.best for h in first.history] == [h.best for h in again.history] == [h.best for h in parallel.history]
    assert first.shifted_weights > 0
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()


def test_fakequantize_models_are_refined_too(tiny_irs, tmp_path):
    result = evoquant.refine(tiny_irs.fakequantize, reference=tiny_irs.fp32, output=tmp_path / "fq.xml", config=SMALL)
    assert result.evaluations > 1
    written = find_quantized_weights(read_ir(tmp_path / "fq.xml"))
    assert [w.form for w in written] == ["fakequantize"] * 3


def test_python_hook_and_module_hook_drive_the_search(tiny_irs, tmp_path):
    seen = []

    def hook(outputs, teacher, labels):
        seen.append(len(outputs[0]))
        return float(np.mean((outputs[0] - teacher[0]) ** 2))

    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness=hook, config=SMALL)
    assert seen and set(seen) == {32}
    assert result.objective == "hook"
    by_name = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness="tests.hooks.fitness_hooks:logit_distance", config=SMALL)
    assert by_name.objective.endswith("logit_distance")
    assert by_name.selection_after <= by_name.selection_before


@pytest.mark.parametrize("hook, message", [("tests.hooks.fitness_hooks:returns_nan", "finite"), ("tests.hooks.fitness_hooks:returns_text", "not a number"), ("tests.hooks.nowhere:f", "cannot import"), ("tests.hooks.fitness_hooks:absent", "no callable"), ("no_colon", "module:function")])
def test_broken_hooks_are_user_errors(tiny_irs, tmp_path, hook, message):
    with pytest.raises(EvoquantError, match=message):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness=hook, output=tmp_path / "o.xml", config=SMALL)
    assert not (tmp_path / "o.xml").exists()


def test_refine_never_hands_back_a_worse_model(tiny_irs, tmp_path):
    """A fitness for which every change is worse: the unchanged model must be written."""

    def distance_to_start(outputs, teacher, labels, _start={}):
        key = outputs[0].shape
        reference = _start.setdefault(key, outputs[0].copy())  # the first call scores the start model
        return float(np.sum((outputs[0] - reference) ** 2))

    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness=distance_to_start, output=tmp_path / "same.xml", config=SMALL)
    assert not result.improved
    assert result.shifted_weights == 0
    # the same weights byte for byte; the .xml differs only by the record of its .bin (evoquant.paths)
    assert (tmp_path / "same.bin").read_bytes() == tiny_irs.int8.with_suffix(".bin").read_bytes()
    assert _without_bin_record((tmp_path / "same.xml").read_text()) == _without_bin_record(tiny_irs.int8.read_text())


def _without_bin_record(xml: str) -> str:
    import re

    xml = re.sub(r"\s*<evoquant_bin_sha256 [^>]*/>", "", xml)
    return re.sub(r"\s*<rt_info>\s*</rt_info>", "", xml).strip()


def test_heldout_metrics_include_reference_accuracy(tiny_irs):
    rng = np.random.default_rng(0)
    images = rng.random((50, 3, 8, 8), dtype=np.float32)
    labels = rng.integers(0, 10, size=50)
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, heldout=(images, labels), config=SMALL)
    assert result.heldout_reference.agreement == 1.0
    assert 0 <= result.heldout_before.accuracy <= 1 and result.heldout_after.kl is not None
    # every stage's result is scored on the held-out data too, the one written among them
    by_stage = {stage.name: stage.heldout for stage in result.stages}
    assert set(by_stage) == set(SMALL.stages) and all(metrics is not None and metrics.kl is not None for metrics in by_stage.values())
    if result.chosen_stage != "start":
        assert by_stage[result.chosen_stage] == result.heldout_after


def test_wrong_inputs_are_user_errors(tiny_irs, tmp_path):
    with pytest.raises(EvoquantError, match="overwrite the input"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, output=tiny_irs.int8, config=SMALL)
    with pytest.raises(EvoquantError, match="unknown objective"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, objective="entropy", config=SMALL)
    with pytest.raises(EvoquantError, match="reference"):
        evoquant.refine(tiny_irs.int8, config=SMALL)
    with pytest.raises(EvoquantError, match="shape"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=np.zeros((100, 1, 8, 8), np.float32), config=SMALL)
    with pytest.raises(EvoquantError, match="labelled"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, objective="ce", data="noise", config=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_distributed_backend_slots_in_without_changing_the_result(tiny_irs):
    pytest.importorskip("dask.distributed")
    from evoquant.fitness.parallel import cluster_backend

    local = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=SMALL)
    with cluster_backend("dask"):
        distributed = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=SMALL.replace(jobs=2, backend="dask"))
    assert [h.best for h in distributed.history] == [h.best for h in local.history]


def test_unknown_backend_is_a_user_error(tiny_irs):
    with pytest.raises(EvoquantError, match="backend"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=SMALL.replace(jobs=2, backend="mpi"))


def test_a_closure_hook_runs_in_worker_processes(tiny_irs):
    scale = 2.0
    hook = lambda outputs, teacher, labels: scale * float(np.mean(np.abs(outputs[0] - teacher[0])))  # noqa: E731
    local = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness=hook, config=SMALL)
    parallel = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, fitness=hook, config=SMALL.replace(jobs=2))
    assert [h.best for h in parallel.history] == [h.best for h in local.history]


@pytest.mark.parametrize("preset", ["default", "fast", "thorough"])
def test_presets_load_and_flags_override_them(preset):
    config = RefineConfig.from_yaml(preset)
    assert config.data == "fractal" and config.search.max_shift == 1
    changed = config.replace(jobs=2, search={"generations": 7, "seed": None})
    assert (changed.jobs, changed.search.generations, changed.search.seed) == (2, 7, config.search.seed)


def test_a_config_file_with_an_unknown_key_is_a_user_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("search:\n  generationz: 3\n")
    with pytest.raises(EvoquantError, match="generationz"):
        RefineConfig.from_yaml(tmp_path / "bad.yaml")


def test_workers_draw_their_own_fitness_images_from_the_spec(tiny_irs):
    import pickle

    from evoquant.fitness.evaluator import FitnessContext, ImageDraw, PlainEvaluator

    from evoquant.data.preprocess import InputSpec

    draw = ImageDraw("fractal", 48, 0, 32, (3, 8, 8), 1234, InputSpec((0.0, 1.0)))
    images = draw.materialize()
    context = FitnessContext(str(tiny_irs.int8), images, None, None, "mse", 1, draw)
    shipped = pickle.loads(pickle.dumps(context))
    assert shipped.images is None, "images are not sent when the worker can draw them"
    assert len(pickle.dumps(context)) < images.nbytes
    evaluator = PlainEvaluator(shipped)
    np.testing.assert_array_equal(evaluator.context.images, images)
    assert images.shape == (32, 3, 8, 8)
