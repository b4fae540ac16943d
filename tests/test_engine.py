"""The suffix engine: same fitness as the plain path, on graphs with branches, within its cache budget."""

from __future__ import annotations

import numpy as np
import pytest

import evoquant
from evoquant.config import RefineConfig, SearchConfig
from evoquant.errors import EvoquantError
from evoquant.fitness.engine import SuffixEngine
from evoquant.fitness.evaluator import FitnessContext, PlainEvaluator
from evoquant.ir.cut import plan_cut
from evoquant.ir.runtime import compile_ir, infer, read_ir
from evoquant.search.genome import Genome, SearchSpace
from evoquant.search.operators import mutate_random


def context_for(path, reference, n=48):
    images = np.random.default_rng(2).random((n, 3, 8, 8), dtype=np.float32)
    teacher = infer(compile_ir(read_ir(reference), f32=True), images)
    return FitnessContext(str(path), images, teacher, None, "kl", 1)


def family(table, seed=0, per_tensor=4):
    """A parent and children that each differ from it in one tensor (what grouped offspring look like)."""
    space = SearchSpace.from_weights(table)
    rng = np.random.default_rng(seed)
    parent = mutate_random(Genome(), space, rng, fraction=0.1, tensors=2)
    children = [mutate_random(parent, space, rng, fraction=0.1, tensors=1, only=t).payload() for t in range(len(table)) for _ in range(per_tensor)]
    return parent.payload(), children


def test_cut_of_a_branching_graph_takes_the_skip_connection_as_input(tiny_irs):
    model = read_ir(tiny_irs.int8)
    engine = SuffixEngine(context_for(tiny_irs.int8, tiny_irs.fp32))
    depthwise = engine.table[1]
    cut = plan_cut(model, depthwise)
    # The depthwise conv's output joins its own input again in the residual Add: that activation is the
    # suffix's input for both the layer and the skip branch, and the Add is recomputed.
    (frontier,) = cut.frontier
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    readers = {t.get_node().get_friendly_name() for t in ops[frontier.rpartition(":")[0]].output(0).get_target_inputs()}
    assert "depthwise" in readers and any(name in cut.nodes for name in readers - {"depthwise"})
    assert any(ops[name].get_type_name() == "Add" for name in cut.nodes) and cut.outputs == (0,)


@pytest.mark.parametrize("form", ["int8", "fakequantize"])
def test_engine_fitness_matches_the_plain_path(tiny_irs, form):
    path = getattr(tiny_irs, form)
    context = context_for(path, tiny_irs.fp32)
    plain, engine = PlainEvaluator(context), SuffixEngine(context)
    parent, children = family(plain.table)
    engine.evaluate_many([parent])
    scores = engine.evaluate_many(children)
    expected = [plain(child) for child in children]
    np.testing.assert_allclose(scores, expected, rtol=1e-4)
    assert np.argmin(scores) == np.argmin(expected)
    # Every child went through a suffix unless its layer is one the plugin would compute differently
    # (the parent itself is scored on the plain path).
    served = sum(1 for t in range(len(plain.table)) if t in engine.exact_layers) * 4
    assert engine.stats.suffix_evaluations == served
    assert engine.stats.plain_evaluations == 1 + len(children) - served
    assert engine.stats.suffix_compiles <= len(plain.table)


@pytest.fixture(scope="module")
def chain_irs(tmp_path_factory):
    """conv → relu → conv → relu → matmul: no branch, so every cut is one the plugin computes alike."""
    import logging

    import nncf
    import openvino as ov
    import openvino.opset13 as opset

    nncf.set_log_level(logging.ERROR)
    rng = np.random.default_rng(4)
    x = opset.parameter([-1, 3, 8, 8], np.float32, name="input")
    h = opset.relu(opset.convolution(x, opset.constant(rng.normal(size=(8, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1]))
    h = opset.relu(opset.convolution(h, opset.constant(rng.normal(size=(8, 8, 3, 3)).astype(np.float32) * 0.3), [1, 1], [1, 1], [1, 1], [1, 1]))
    logits = opset.matmul(opset.reshape(h, opset.constant(np.array([-1, 512], dtype=np.int64)), False), opset.constant(rng.normal(size=(10, 512)).astype(np.float32) * 0.05), False, True)
    model = ov.Model([logits], [x], "chain")
    folder = tmp_path_factory.mktemp("chain")
    ov.save_model(model, folder / "fp32.xml", compress_to_fp16=False)
    batches = [rng.random((4, 3, 8, 8), dtype=np.float32) for _ in range(8)]
    ov.save_model(nncf.quantize(model, nncf.Dataset(batches), subset_size=32), folder / "int8.xml", compress_to_fp16=False)
    return folder / "int8.xml", folder / "fp32.xml"


def test_engine_serves_a_chain_from_suffixes_with_few_compiles(chain_irs):
    int8, fp32 = chain_irs
    context = context_for(int8, fp32)
    plain, engine = PlainEvaluator(context), SuffixEngine(context)
    parent, children = family(plain.table, per_tensor=5)
    engine.evaluate_many([parent])
    scores = engine.evaluate_many(children)
    np.testing.assert_allclose(scores, [plain(child) for child in children], rtol=1e-4)
    assert engine.stats.suffix_evaluations >= 10, engine.exact_layers
    # A chain ranks alike with f32 kernels below the cut: every layer gets a shared suffix and the shared
    # probe gives any parent's activations, all compiled once at set-up: serving a new parent compiles nothing.
    assert engine.stats.shared_layers == len(plain.table) and engine.stats.suffix_compiles == 0
    assert engine.stats.probe_compiles == 1


def test_a_per_parent_suffix_serves_groups_and_lone_candidates_are_compiled_whole(chain_irs):
    from evoquant.fitness.engine import MIN_PER_PARENT_GROUP

    engine = SuffixEngine(context_for(*chain_irs))
    engine.shared_layers.clear()  # as on a residual net: a suffix compile per (parent, layer)
    parent, children = family(engine.table, per_tensor=MIN_PER_PARENT_GROUP)  # children in tensor order
    engine.evaluate_many([parent])
    engine.evaluate_many(children[:MIN_PER_PARENT_GROUP])  # a full group of tensor 0: one suffix serves it
    assert (engine.stats.suffix_evaluations, engine.stats.suffix_compiles) == (MIN_PER_PARENT_GROUP, 1)
    engine.evaluate_many(children[MIN_PER_PARENT_GROUP : MIN_PER_PARENT_GROUP + 2])  # two: cheaper compiled whole
    assert (engine.stats.suffix_evaluations, engine.stats.suffix_compiles, engine.stats.plain_evaluations) == (MIN_PER_PARENT_GROUP, 1, 3)


def test_plans_depend_on_the_genomes_not_on_caches(chain_irs):
    context = context_for(*chain_irs)
    warm = SuffixEngine(context)
    cold = SuffixEngine(context, layers=warm.layers)  # as a planner whose workers hold the caches
    parent, children = family(warm.table, per_tensor=5)
    for engine in (warm, cold):
        engine._remember(parent)
        engine._remember(children[0])  # an earlier offspring: it differs from its siblings in tensor 0 only
    warm.evaluate_many(children[:1])  # fills the warm engine's caches for (offspring 0's parent, tensor 0)
    plans = warm._plans(children[1:5])
    assert plans == cold._plans(children[1:5]) and len(set(plans)) == 1  # one group, whole


def test_a_tiny_cache_budget_evicts_but_keeps_results(tiny_irs):
    context = context_for(tiny_irs.int8, tiny_irs.fp32)
    roomy, tight = SuffixEngine(context), SuffixEngine(context, max_cache_mb=0.0001, max_compiled=1)
    parent, children = family(roomy.table, seed=3)
    for engine in (roomy, tight):
        engine.evaluate_many([parent])
    assert roomy.evaluate_many(children) == tight.evaluate_many(children)
    assert len(tight.activations) <= 1 and len(tight.suffixes) <= 1


def test_refine_with_the_engine_follows_the_same_search(chain_irs):
    int8, fp32 = chain_irs
    config = RefineConfig(search=SearchConfig(mu=2, lambda_=6, generations=4, patience=None, offspring_groups=2, seed=5), selection_size=32, verification_size=32, progress=False, stages=("reconstruct", "evolve"))
    assert RefineConfig().engine == "suffix"  # the default
    plain = evoquant.refine(int8, reference=fp32, config=config.replace(engine="plain"))
    engine = evoquant.refine(int8, reference=fp32, config=config)
    np.testing.assert_allclose([h.best for h in engine.history], [h.best for h in plain.history], rtol=1e-4)
    assert engine.shifted_weights == plain.shifted_weights
    # The report says how the candidates were scored: every one counted once, most below the changed layer.
    summary = engine.engine
    assert plain.engine is None and summary["suffix_evaluations"] + summary["plain_evaluations"] == engine.evaluations
    assert summary["suffix_evaluations"] > summary["plain_evaluations"] and "suffix engine:" in engine.table()
    # On two workers, each running its own engine from the main engine's layer decisions: the same search.
    parallel = evoquant.refine(int8, reference=fp32, config=config.replace(jobs=2))
    np.testing.assert_allclose([h.best for h in parallel.history], [h.best for h in engine.history], rtol=1e-4)
    assert parallel.shifted_weights == engine.shifted_weights


def test_a_worker_engine_takes_the_main_engines_layer_decisions(chain_irs, tmp_path):
    from functools import partial

    from evoquant.fitness.engine import run_in_worker
    from evoquant.fitness.evaluator import _WORKER_EVALUATORS, save_context

    context = context_for(*chain_irs)
    steps = []
    main = SuffixEngine(context, progress=lambda: steps.append(1))
    assert len(steps) == 3 * len(main.table)  # the set-up's progress: cut, shared check, exactness check
    parent, children = family(main.table, seed=1)
    main.evaluate_many([parent])
    expected = main.evaluate_many(children)
    planner = SuffixEngine(context, layers=main.layers)  # no set-up checks: the same decisions
    assert planner.layers == main.layers and planner.stats.suffix_compiles == 0 and not planner._safety  # no export checks
    worker = partial(run_in_worker, save_context(context, tmp_path / "context.pkl"), main.layers, 64.0)
    planner.evaluate_many([parent], map_items=lambda items: [worker(item) for item in items])
    (engine,) = _WORKER_EVALUATORS.values()  # one engine for the run, built with the given cache budget
    assert isinstance(engine, SuffixEngine) and engine.max_cache_bytes == 64 * 2**20
    scores = planner.evaluate_many(children, map_items=lambda items: [worker(item) for item in items])
    assert scores == expected and planner.stats.suffix_evaluations == main.stats.suffix_evaluations > 0
    assert list(_WORKER_EVALUATORS.values()) == [engine]  # reused by every later item, not rebuilt


def test_engine_settings_are_validated():
    with pytest.raises(EvoquantError, match="unknown engine"):
        RefineConfig(engine="turbo")


def test_the_plugin_clamps_but_does_not_round_a_quantizer_fused_into_a_residual_join():
    """Pins the CPU plugin behaviour the engine's suffixes rely on (fused_residual_quantizers): if a new
    OpenVINO changes it, this fails rather than the engine silently routing layers to the plain path."""
    import openvino as ov
    import openvino.opset13 as opset
    import torch

    from evoquant.ir.cut import fused_residual_quantizers

    rng = np.random.default_rng(0)
    channels = 16

    def quantizer(value, low, high):
        return opset.fake_quantize(value, *(opset.constant(np.float32(v)) for v in (low, high, low, high)), 256)

    def rounded(value, low, high):
        low, high = np.float32(low), np.float32(high)
        return np.round((np.clip(value, low, high) - low) / (high - low) * 255) / 255 * (high - low) + low

    def conv(value, seed):
        r = np.random.default_rng(seed)
        states = r.integers(-127, 128, size=(channels, channels, 3, 3)).astype(np.int8)
        scale = (r.random((channels, 1, 1, 1)) * 0.002 + 0.001).astype(np.float32)
        bias = (r.normal(size=(1, channels, 1, 1)) * 0.1).astype(np.float32)
        node = opset.add(opset.convolution(value, opset.multiply(opset.convert(opset.constant(states), np.float32), opset.constant(scale)), [1, 1], [1, 1], [1, 1], [1, 1]), opset.constant(bias))
        return node, lambda x: torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(states * scale.astype(np.float64)), padding=1).numpy() + bias

    block_in, hidden, join, out = (0.0, 4.84646), (0.0, 3.1234), (-128 * 0.041422, 127 * 0.041422), (0.0, 7.7540216)
    x = opset.parameter([-1, channels, 14, 14], np.float32, name="x")
    skip = quantizer(x, *block_in)
    first, first_np = conv(skip, 1)
    h = quantizer(opset.relu(first), *hidden)
    second, second_np = conv(h, 2)
    joined = quantizer(second, *join)
    model = ov.Model([quantizer(opset.relu(opset.add(joined, skip)), *out).output(0)], [x])
    assert fused_residual_quantizers(model) == {joined.get_friendly_name()}

    images = (rng.random((16, channels, 14, 14)) * 5).astype(np.float32)
    plugin = infer(compile_ir(model), images)[0].astype(np.float64)
    skip_np = rounded(images.astype(np.float64), *block_in)
    conv_np = second_np(rounded(np.maximum(first_np(skip_np), 0), *hidden))
    step = (out[1] - out[0]) / 255
    reference = rounded(np.maximum(rounded(conv_np, *join) + skip_np, 0), *out)
    clamp_only = rounded(np.maximum(np.clip(conv_np, *join) + skip_np, 0), *out)
    assert np.mean(np.abs(plugin - clamp_only) > step / 2) < 1e-3
    assert np.mean(np.abs(plugin - reference) > step / 2) > 0.05
