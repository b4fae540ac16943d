"""The ranges stage: which quantizers are activations', how their ranges scale, what the observed ranges are,
how candidates are chosen, and refine with and without the stage."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

import evoquant
from conftest import INPUT_SHAPE
from evoquant import EvoquantError, EvoquantWarning
from evoquant.config import RangesConfig, RefineConfig, ReconstructConfig
from evoquant.ir.ranges import activation_quantizers, input_quantizers, input_range_factors, observed_range_factors, scale_activation_ranges
from evoquant.ir.runtime import compile_ir, infer, read_ir
from evoquant.ir.weights import find_quantized_weights
from evoquant.reconstruct import ranges as ranges_module
from evoquant.reconstruct.stage import ReconstructResult
from test_cli import run_cli

SMALL = dict(input_shape=(1, *INPUT_SHAPE), progress=False, config=RefineConfig(selection_size=32, verification_size=64, selection_pool=128))


def _bounds(node) -> list[np.ndarray]:
    values = []
    for port in (1, 2, 3, 4):
        source = node.input_value(port).get_node()
        if source.get_type_name() == "Convert":
            source = source.input_value(0).get_node()
        values.append(np.asarray(source.get_data(), dtype=np.float64))
    return values


def _fake_quantize(x, low: float, high: float, *, name: str, fp16_bounds: bool = False):
    def bound(value):
        constant = opset.constant(np.array(value, dtype=np.float16 if fp16_bounds else np.float32))
        return opset.convert(constant, ov.Type.f32) if fp16_bounds else constant

    node = opset.fake_quantize(x, bound(low), bound(high), bound(low), bound(high), 256)
    node.set_friendly_name(name)
    return node


def _quantized_chain(fp16_bounds: bool = False, shared: bool = False, input_high: float = 1.0) -> ov.Model:
    """input → Multiply(1/255) → FQ(input) → conv with an FQ'd weight → relu → FQ(act) → + → FQ(sum):
    one quantizer of each kind (the model input's, a weight's, activations')."""
    x = opset.parameter([-1, 1, 4, 4], np.float32, name="input")
    scaled = opset.multiply(x, opset.constant(np.float32(1 / 255)))
    quantized_input = _fake_quantize(scaled, 0.0, input_high, name="fq_input")
    weight = _fake_quantize(opset.constant(np.full((1, 1, 1, 1), 0.5, dtype=np.float32)), -1.0, 1.0, name="fq_weight")
    conv = opset.convolution(quantized_input, weight, [1, 1], [0, 0], [0, 0], [1, 1])
    relu = _fake_quantize(opset.relu(conv), 0.0, 0.25, name="fq_relu", fp16_bounds=fp16_bounds)
    other = _fake_quantize(opset.relu(conv), 0.0, 0.25 if shared else 0.4, name="fq_other")
    total = _fake_quantize(opset.add(relu, other), -0.5, 0.5, name="fq_sum")
    return ov.Model([total], [x], "chain")


def test_activation_quantizers_leave_out_the_model_inputs_and_the_weights():
    assert [node.get_friendly_name() for node in activation_quantizers(_quantized_chain())] == ["fq_relu", "fq_other", "fq_sum"]
    assert [node.get_friendly_name() for node in input_quantizers(_quantized_chain())] == ["fq_input"]


def test_the_input_quantizer_is_widened_to_the_declared_range_through_the_preprocessing():
    # the graph divides by 255: a declared range [0, 255] reaches 1.0 at the quantizer, whose range ends at 0.8
    extremes = np.stack([np.zeros((1, 4, 4)), np.full((1, 4, 4), 255.0)]).astype(np.float32)
    assert input_range_factors(_quantized_chain(input_high=0.8), extremes) == {"fq_input": pytest.approx(1.25, rel=1e-4)}
    assert input_range_factors(_quantized_chain(input_high=0.8), extremes * 0.5) == {"fq_input": 1.0}  # never narrowed
    model = _quantized_chain(input_high=0.8)
    scale_activation_ranges(model, {"fq_input": 1.25})  # a mapping may name the input's quantizer
    assert _bounds(input_quantizers(model)[0])[1] == pytest.approx(1.0)
    scale_activation_ranges(model, 2.0)  # a number scales the activation quantizers only
    assert _bounds(input_quantizers(model)[0])[1] == pytest.approx(1.0)


@pytest.mark.parametrize("fp16_bounds", [False, True])
def test_scaling_multiplies_all_four_bounds_of_activation_quantizers_only(fp16_bounds):
    model = _quantized_chain(fp16_bounds=fp16_bounds)
    before = {node.get_friendly_name(): _bounds(node) for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"}
    scaling = scale_activation_ranges(model, {"fq_relu": 2.0, "fq_sum": 1.5})
    assert scaling.scaled == 4 and scaling.not_constant == ()  # a mapping may name the input's quantizer too: counted
    after = {node.get_friendly_name(): _bounds(node) for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize"}
    for name, factor in {"fq_relu": 2.0, "fq_sum": 1.5, "fq_other": 1.0, "fq_input": 1.0, "fq_weight": 1.0}.items():
        for old, new in zip(before[name], after[name]):
            np.testing.assert_allclose(new, old * factor, rtol=1e-3)
    scale_activation_ranges(model, 2.0)  # a number scales every activation quantizer
    assert _bounds(next(n for n in activation_quantizers(model) if n.get_friendly_name() == "fq_other"))[1] == pytest.approx(0.8)
    with pytest.raises(ValueError, match="positive"):
        scale_activation_ranges(model, 0.0)


def test_a_scaled_asymmetric_range_keeps_zero_on_a_level():
    low, high, levels = -0.3, 5.1, 256
    step = (high - low) / (levels - 1)
    zero_level = round(-low / step)
    low, high = -zero_level * step, (levels - 1 - zero_level) * step  # NNCF's zero-aligned range
    x = opset.parameter([1, 4], np.float32)
    model = ov.Model([_fake_quantize(opset.relu(x), low, high, name="fq")], [x])
    scale_activation_ranges(model, 1.7)
    output = infer(compile_ir(model, f32=True), np.zeros((1, 4), dtype=np.float32))[0]
    assert np.all(np.abs(output) < 1e-6 * high)  # zero is a level (up to float rounding), not half a step off


def test_a_range_that_is_not_a_constant_is_reported_not_scaled():
    x = opset.parameter([1, 4], np.float32)
    high = opset.reduce_max(opset.relu(x), opset.constant(np.array([0, 1], dtype=np.int64)), False)
    node = opset.fake_quantize(opset.relu(x), opset.constant(np.float32(0)), high, opset.constant(np.float32(0)), high, 256)
    node.set_friendly_name("dynamic")
    scaling = scale_activation_ranges(ov.Model([node], [x]), 2.0)
    assert scaling.scaled == 0 and scaling.not_constant == ("dynamic",)


def test_observed_factors_cover_the_largest_value_and_never_narrow():
    model = _quantized_chain()
    images = np.full((3, 1, 4, 4), 255.0, dtype=np.float32)
    images[1] *= 0.1
    # conv output 0.5 · x: at most 0.5 after relu; fq_relu's high is 0.25 (x2), fq_other's 0.4 (x1.25); the
    # sum reaches 0.5 (its input is already clipped to 0.25 + 0.4 by the quantizers before it): x1.3 on 0.5
    factors = observed_range_factors(model, images, batch_size=2)
    assert factors["fq_relu"] == pytest.approx(2.0, rel=0.02)
    assert factors["fq_other"] == pytest.approx(1.25, rel=0.02)
    assert factors["fq_sum"] == pytest.approx(1.3, rel=0.02)
    assert observed_range_factors(model, images * 0.01)["fq_relu"] == 1.0  # small inputs: ranges are never narrowed


def test_quantizers_sharing_a_range_keep_sharing_one():
    factors = observed_range_factors(_quantized_chain(shared=True), np.full((1, 1, 4, 4), 255.0, dtype=np.float32))
    assert factors["fq_relu"] == factors["fq_other"] == pytest.approx(2.0, rel=0.02)


def _fake_reconstruct(calls):
    def reconstruct(model, table, teacher, images, config, **_):
        calls.append({node.get_friendly_name(): float(_bounds(node)[1]) for node in activation_quantizers(model)})
        return ReconstructResult({})
    return reconstruct


@pytest.mark.parametrize("candidates, factors, scores, chosen, tried", [
    (("observed",), (), {}, "observed", []),  # one candidate: taken with no trial
    (("nncf", "observed"), (), {"nncf": 1.0, "observed": 0.5}, "observed", ["nncf", "observed"]),
    (("nncf", "observed"), (), {"nncf": 1.0, "observed": 0.97}, "nncf", ["nncf", "observed"]),  # within min_gain: the first
    (("nncf",), (1.25, 1.5, 2.0), {"nncf": 1.0, "nncf x1.25": 0.5, "nncf x1.5": 0.6}, "nncf x1.25", ["nncf", "nncf x1.25", "nncf x1.5"]),
    (("nncf",), (0.8, 1.25), {"nncf": 1.0, "nncf x1.25": 1.2, "nncf x0.8": 0.9}, "nncf x0.8", ["nncf", "nncf x1.25", "nncf x0.8"]),
])
def test_candidates_are_reconstructed_scored_and_the_best_taken(tiny_irs, monkeypatch, candidates, factors, scores, chosen, tried):
    calls = []
    monkeypatch.setattr(ranges_module, "reconstruct", _fake_reconstruct(calls))
    model = read_ir(tiny_irs.int8)
    from evoquant.ir.runtime import with_sample_shape

    model = with_sample_shape(model, INPUT_SHAPE)
    table = find_quantized_weights(model)
    names = iter(tried)

    def score(scaled, scaled_table, states):
        return scores[next(names)]

    images = np.random.default_rng(0).random((16, *INPUT_SHAPE), dtype=np.float32)
    result = ranges_module.fit_ranges(model, table, None, images, ReconstructConfig(images=16), RangesConfig(candidates=candidates, factors=factors), score)
    assert result.chosen == chosen and [trial.name for trial in result.trials] == tried
    assert len(calls) == len(tried)
    if chosen.startswith("nncf"):
        expected = float(chosen.split("x")[1]) if "x" in chosen else 1.0
        assert set(result.factors.values()) == {expected}
    else:
        assert all(factor >= 1.0 for factor in result.factors.values())


def test_ranges_settings_are_checked():
    with pytest.raises(EvoquantError, match="candidates"):
        RangesConfig(candidates=("widest",))
    with pytest.raises(EvoquantError, match="other than 1"):
        RangesConfig(factors=(1.0,))
    with pytest.raises(EvoquantError, match="min_gain"):
        RangesConfig(min_gain=1.5)


def test_refine_reports_the_ranges_stage_and_writes_the_widened_ranges(tiny_irs, tmp_path):
    output = tmp_path / "refined.xml"
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=tiny_irs.data, output=output, stages="ranges,reconstruct", **SMALL)
    assert [stage.name for stage in result.stages] == ["ranges", "reconstruct"]
    details = result.stages[0].details
    assert details["chosen"] == "observed" and details["quantizers"] == len(activation_quantizers(read_ir(tiny_irs.int8)))
    assert details["widened"] >= 1 and details["factor_max"] > 1.0
    assert result.stages[0].verification.fitness is not None
    written = {node.get_friendly_name(): _bounds(node)[1] for node in activation_quantizers(read_ir(output))}
    start = {node.get_friendly_name(): _bounds(node)[1] for node in activation_quantizers(read_ir(tiny_irs.int8))}
    if result.chosen_stage != "start":  # the written model is the widened one (when a stage beat the start)
        for name, factor in details["factors"].items():
            if name not in details["input_factors"]:
                np.testing.assert_allclose(written[name], start[name] * factor, rtol=1e-5)
    # NNCF's input range came from images that stop short of 1.0: widened to the declared [0, 1]
    (name, factor), = details["input_factors"].items()
    start_high = _bounds(input_quantizers(read_ir(tiny_irs.int8))[0])[1]
    assert float(start_high) < 1.0 and factor == pytest.approx(1.0 / float(start_high), rel=1e-4)
    if result.chosen_stage != "start":
        assert float(_bounds(input_quantizers(read_ir(output))[0])[1]) == pytest.approx(1.0, rel=1e-5)


def test_the_input_quantizer_covers_the_declared_input_range_or_is_kept(tiny_irs):
    start_high = float(_bounds(input_quantizers(read_ir(tiny_irs.int8))[0])[1])
    wide = SMALL["config"].replace(value_range=(0.0, 2.0))
    with pytest.warns(EvoquantWarning, match=r"input quantizer covered 1/2\.0.*--input-range"):
        result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=tiny_irs.data, stages="ranges,reconstruct", **{**SMALL, "config": wide})
    assert list(result.stages[0].details["input_factors"].values()) == [pytest.approx(2.0 / start_high, rel=1e-4)]
    kept = SMALL["config"].replace(ranges={"cover_input": False})
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=tiny_irs.data, stages="ranges,reconstruct", **{**SMALL, "config": kept})
    assert result.stages[0].details["input_factors"] == {}


def test_candidates_reuse_the_chosen_reconstruction(tiny_irs):
    config = RefineConfig(selection_size=32, verification_size=64, selection_pool=128).replace(ranges={"candidates": ("nncf", "observed")})
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=tiny_irs.data, stages="ranges,reconstruct", input_shape=(1, *INPUT_SHAPE), progress=False, config=config)
    ranges, reconstruct = result.stages
    assert [trial["name"] for trial in ranges.details["trials"]] == ["nncf", "observed"]
    assert reconstruct.details["from_ranges_stage"] is True
    assert reconstruct.seconds == next(trial["seconds"] for trial in ranges.details["trials"] if trial["name"] == ranges.details["chosen"])


def test_the_ranges_stage_needs_the_reconstruct_stage(tiny_irs):
    code, _, stderr = run_cli("refine", str(tiny_irs.int8), "-r", str(tiny_irs.fp32), "--data", str(tiny_irs.data), "--stages", "ranges,evolve", "-q")
    assert code != 0 and "ranges stage" in stderr and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_a_config_file_sets_the_ranges_candidates(tiny_irs, tmp_path):
    config = tmp_path / "ranges.yaml"
    config.write_text("ranges:\n  candidates: [nncf]\n")
    report = tmp_path / "report.json"
    code, _, stderr = run_cli("refine", str(tiny_irs.int8), "-r", str(tiny_irs.fp32), "--data", str(tiny_irs.data), "--config", str(config), "--stages", "ranges,reconstruct",
                              "--selection-size", "32", "--verification-size", "64", "--selection-pool", "128", "-q", "--report", str(report))
    assert code == 0, stderr
    ranges = next(stage for stage in json.loads(report.read_text())["stages"] if stage["name"] == "ranges")
    assert ranges["details"]["chosen"] == "nncf" and ranges["details"]["widened"] == 0
    config.write_text("ranges:\n  candidates: [widest]\n")
    code, _, stderr = run_cli("refine", str(tiny_irs.int8), "-r", str(tiny_irs.fp32), "--data", str(tiny_irs.data), "--config", str(config), "-q")
    assert code != 0 and "candidates" in stderr and "Traceback" not in stderr
