"""Weight discovery, bounds and write-back on IRs built in code."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

from evoquant.errors import EvoquantError
from evoquant.ir.patch import ConstantPatcher
from evoquant.paths import save_ir as save_atomically
from evoquant.ir.runtime import compile_ir, infer, read_ir
from evoquant.ir.weights import attach_reference, find_quantized_weights, require_quantized_weights
from tests.conftest import ops_by_name

TYPE_RANGES = {"i8": (-128, 127), "u8": (0, 255), "i4": (-8, 7), "u4": (0, 15)}


def compressed_model(element_type: str, *, zero_point: bool, seed: int = 0) -> tuple[ov.Model, np.ndarray]:
    """Parameter → Convolution whose weight is Constant(int) → Convert → [Subtract] → Multiply."""
    rng = np.random.default_rng(seed)
    low, high = TYPE_RANGES[element_type]
    if element_type.startswith("i") and not zero_point:
        low = -high  # symmetric narrow range, as NNCF does
    states = rng.integers(low, high + 1, size=(6, 2, 3, 3))
    states[0, 0, 0, 0] = high  # a min-max quantizer always puts an extreme on the bound
    x = opset.parameter([-1, 2, 5, 5], np.float32, name="input")
    weight = opset.constant(states.astype(np.int8 if element_type.startswith("i") else np.uint8), dtype=getattr(ov.Type, element_type))
    chain = opset.convert(weight, np.float32)
    if zero_point:
        chain = opset.subtract(chain, opset.constant(np.full((6, 1, 1, 1), (low + high) // 2, dtype=np.float32)))
    chain = opset.multiply(chain, opset.constant(rng.uniform(0.01, 0.1, size=(6, 1, 1, 1)).astype(np.float32)))
    conv = opset.convolution(x, chain, [1, 1], [0, 0], [0, 0], [1, 1])
    conv.set_friendly_name("conv")
    flat = opset.reshape(conv, opset.constant(np.array([-1, 54], dtype=np.int64)), False)  # an int Constant that is no weight
    return ov.Model([flat], [x], f"compressed_{element_type}"), states


@pytest.mark.parametrize("element_type", ["i8", "u8", "i4", "u4"])
@pytest.mark.parametrize("zero_point", [False, True])
def test_compressed_weights_found_with_exact_states(element_type, zero_point):
    model, states = compressed_model(element_type, zero_point=zero_point)
    table = find_quantized_weights(model)
    assert len(table) == 1, "only the weight chain matches, not the Reshape's int64 shape constant"
    weight = table[0]
    assert (weight.form, weight.element_type, weight.consumer, weight.consumer_type) == ("compressed", element_type, "conv", "Convolution")
    np.testing.assert_array_equal(weight.states, states)
    assert weight.granularity == "per-channel (axis 0: 6)"
    type_low, type_high = TYPE_RANGES[element_type]
    if element_type.startswith("i") and not zero_point:
        assert (weight.low, weight.high) == (-type_high, type_high)
    else:
        assert (weight.low, weight.high) == (type_low, type_high)


@pytest.mark.parametrize("element_type", ["i8", "u8", "i4", "u4"])
def test_patched_states_round_trip_through_a_saved_ir(tmp_path, element_type):
    model, states = compressed_model(element_type, zero_point=element_type.startswith("u"))
    table = find_quantized_weights(model)
    weight = table[0]
    new_states = np.clip(states + np.where(np.arange(states.size).reshape(states.shape) % 3 == 0, 1, 0), weight.low, weight.high)
    patcher = ConstantPatcher(model, table)
    patcher.apply({0: new_states})
    save_atomically(model, tmp_path / "patched.xml")
    reloaded = find_quantized_weights(read_ir(tmp_path / "patched.xml"))
    np.testing.assert_array_equal(reloaded[0].states, new_states)
    patcher.restore()
    np.testing.assert_array_equal(find_quantized_weights(model)[0].states, states)


def test_nncf_compressed_ir_discovery_and_first_layer_bounds(tiny_irs):
    table = require_quantized_weights(read_ir(tiny_irs.int8), "int8")
    assert [w.consumer for w in table] == ["conv1", "depthwise", "fc"]
    assert [w.consumer_type for w in table] == ["Convolution", "GroupConvolution", "MatMul"]
    assert all(w.form == "compressed" and w.element_type == "i8" for w in table)
    # NNCF's overflow fix quantizes the first layer into [-63, 63] on purpose; the rest use [-127, 127].
    assert (table[0].low, table[0].high) == (-63, 63)
    assert all((w.low, w.high) == (-127, 127) for w in table.weights[1:])
    assert [np.shape(w.scale) for w in table] == [(4, 1, 1, 1), (4, 1, 1, 1, 1), (10, 1)]


def test_fakequantize_form_matches_the_compressed_form(tiny_irs):
    compressed = find_quantized_weights(read_ir(tiny_irs.int8))
    fakequantize = find_quantized_weights(read_ir(tiny_irs.fakequantize))
    assert [w.form for w in fakequantize] == ["fakequantize"] * 3
    assert [w.consumer for w in fakequantize] == [w.consumer for w in compressed]
    for fq, int8 in zip(fakequantize, compressed):
        centre = (fq.levels - 1) // 2
        np.testing.assert_array_equal(fq.states - centre, int8.states)
        assert (fq.low - centre, fq.high - centre) == (int8.low, int8.high)
        np.testing.assert_allclose(fq.values(fq.states), int8.values(int8.states), rtol=1e-5, atol=1e-7)
        assert np.abs(fq.rounding_residual).max() <= 0.5 + 1e-9


def test_reference_gives_rounding_residuals_for_compressed_weights(tiny_irs):
    table = find_quantized_weights(read_ir(tiny_irs.int8))
    assert not table.has_residuals
    assert attach_reference(table, read_ir(tiny_irs.fp32)) == 3
    fq_table = find_quantized_weights(read_ir(tiny_irs.fakequantize))
    for weight, fq_weight in zip(table, fq_table):
        assert np.abs(weight.rounding_residual).max() <= 0.5 + 1e-6
        # Residuals from the FP32 reference equal the ones the FakeQuantize form carries itself.
        np.testing.assert_allclose(weight.rounding_residual, fq_weight.rounding_residual, atol=1e-4)


@pytest.mark.parametrize("form", ["int8", "fakequantize"])
def test_write_back_changes_only_weight_constants(tiny_irs, tmp_path, form):
    path = getattr(tiny_irs, form)
    model = read_ir(path)
    table = find_quantized_weights(model)
    rng = np.random.default_rng(0)
    expected = {}
    for weight in table:
        step = rng.choice([-1, 0, 1], size=weight.shape)
        expected[weight.index] = np.clip(weight.states + step, weight.low, weight.high)
    patcher = ConstantPatcher(model, table)
    patcher.apply(expected)
    save_atomically(model, tmp_path / "out.xml")

    original, written = ops_by_name(read_ir(path)), ops_by_name(read_ir(tmp_path / "out.xml"))
    assert original.keys() == written.keys()
    patched_names = {w.constant_name for w in table}
    for name, op in original.items():
        other = written[name]
        assert op.get_type_name() == other.get_type_name()
        assert op.get_output_element_type(0) == other.get_output_element_type(0), f"{name} changed its element type"
        assert [str(i.get_source_output().get_node().get_friendly_name()) for i in op.inputs()] == [
            str(i.get_source_output().get_node().get_friendly_name()) for i in other.inputs()
        ]
        if op.get_type_name() == "Constant" and name not in patched_names:
            np.testing.assert_array_equal(op.get_data(), other.get_data())
        elif op.get_type_name() != "Constant":
            assert op.get_attributes() == other.get_attributes()
    reloaded = find_quantized_weights(read_ir(tmp_path / "out.xml"))
    for weight in reloaded:
        np.testing.assert_array_equal(weight.states, expected[weight.index])
    # The written IR still runs in stock OpenVINO and differs from the original in its outputs.
    images = np.random.default_rng(1).random((4, 3, 8, 8), dtype=np.float32)
    assert np.isfinite(infer(compile_ir(read_ir(tmp_path / "out.xml")), images)[0]).all()


def test_patch_refuses_states_outside_the_bounds(tiny_irs):
    model = read_ir(tiny_irs.int8)
    table = find_quantized_weights(model)
    too_far = table[0].states.copy()
    too_far.flat[0] = table[0].high + 1
    with pytest.raises(ValueError, match="range"):
        ConstantPatcher(model, table).apply({0: too_far})


def test_save_is_atomic_and_leaves_no_temporary_files(tiny_irs, tmp_path):
    model = read_ir(tiny_irs.int8)
    save_atomically(model, tmp_path / "a.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.xml"]


def test_model_without_quantized_weights_is_a_user_error(tiny_irs):
    with pytest.raises(EvoquantError, match="no quantized weights"):
        require_quantized_weights(read_ir(tiny_irs.fp32), "fp32.xml")


def test_broken_ir_files_give_one_line_errors(tiny_irs, tmp_path):
    (tmp_path / "bad.xml").write_text("<net><layers>")
    with pytest.raises(EvoquantError, match="malformed XML"):
        read_ir(tmp_path / "bad.xml")
    (tmp_path / "nobin.xml").write_bytes(tiny_irs.int8.read_bytes())
    with pytest.raises(EvoquantError, match="missing"):
        read_ir(tmp_path / "nobin.xml")
    (tmp_path / "short.xml").write_bytes(tiny_irs.int8.read_bytes())
    weights = tiny_irs.int8.with_suffix(".bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(EvoquantError, match="truncated"):
        read_ir(tmp_path / "short.xml")
    with pytest.raises(EvoquantError, match="no such model"):
        read_ir(tmp_path / "absent.xml")


@pytest.mark.parametrize("largest, bounds", [(63, (-63, 63)), (64, (-64, 64)), (100, (-127, 127)), (127, (-127, 127))])
def test_symmetric_bounds_follow_the_range_the_quantizer_used(largest, bounds):
    """NNCF's overflow fix halves the first layer's range; its extremes land on 63 or (rounded) 64."""
    model, _ = compressed_model("i8", zero_point=False)
    table = find_quantized_weights(model)
    states = np.clip(table[0].states, -largest, largest)
    states.flat[0] = largest
    ConstantPatcher(model, table).apply({0: np.clip(states, table[0].low, table[0].high)})
    assert (find_quantized_weights(model)[0].low, find_quantized_weights(model)[0].high) == bounds
