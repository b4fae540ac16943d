"""4-bit weight storage: widening to 8-bit constants, the record that keeps the 4-bit range, the
multi-stream check (evoquant.ir.storage), and refine / quantize writing through it."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

from evoquant.errors import EvoquantError
from evoquant.ir.runtime import compile_ir, infer, read_ir
from evoquant.ir.storage import TOLERANCE, settle_storage, widen
from evoquant.ir.weights import WIDENED_RECORD, find_quantized_weights, widened_ranges
from evoquant.paths import save_ir


def _fake_quantize(node, high: float):
    low, top = opset.constant(np.float32(0.0)), opset.constant(np.float32(high))
    return opset.fake_quantize(node, low, top, low, top, 256)


def w4a8_model(seed: int = 0, *, fp32: bool = False, kernel: int = 1) -> ov.Model:
    """NNCF's W4A8 form on 1x1 convolutions (the kernels OpenVINO 2026.4 gets wrong with several streams):
    FakeQuantize → Conv 1x1 (i4, 3→16) → ReLU → FakeQuantize → Conv 1x1 (u4 with a zero point, 16→8) →
    ReduceMean → MatMul (i4, 8→3: a transformer's kind of 4-bit weight, never widened). ``fp32``: the
    same network with the dequantized weights as float constants and no FakeQuantize (its reference);
    ``kernel`` 3: 3x3 convolutions instead (padded), which the defect is not known on."""
    rng = np.random.default_rng(seed)

    def weight(shape, element_type, zero_point=0):
        low, high = (-7, 7) if element_type == "i4" else (0, 15)
        states = rng.integers(low, high + 1, size=shape)
        states.flat[0] = high
        scale = rng.uniform(0.02, 0.05, size=(shape[0],) + (1,) * (len(shape) - 1)).astype(np.float32)
        if fp32:
            return opset.constant(((states - zero_point) * scale).astype(np.float32))
        chain = opset.convert(opset.constant(states.astype(np.int8 if element_type == "i4" else np.uint8), dtype=getattr(ov.Type, element_type)), np.float32)
        if zero_point:
            chain = opset.subtract(chain, opset.constant(np.float32(zero_point)))
        return opset.multiply(chain, opset.constant(scale))

    def quantized(node, high):
        return node if fp32 else _fake_quantize(node, high)

    x = opset.parameter([-1, 3, 6, 6], np.float32, name="input")
    pad = [kernel // 2] * 2
    conv1 = opset.convolution(quantized(x, 1.0), weight((16, 3, kernel, kernel), "i4"), [1, 1], pad, pad, [1, 1])
    conv2 = opset.convolution(quantized(opset.relu(conv1), 2.0), weight((8, 16, kernel, kernel), "u4", zero_point=8), [1, 1], pad, pad, [1, 1])
    fc = opset.matmul(opset.reduce_mean(conv2, opset.constant(np.array([2, 3])), False), weight((3, 8), "i4"), False, True)
    for node, name in ((conv1, "conv1"), (conv2, "conv2"), (fc, "fc")):
        node.set_friendly_name(name)  # the reference's layers carry the same names
    return ov.Model([fc], [x], "w4a8")


IMAGES = np.random.default_rng(3).random((32, 3, 6, 6), dtype=np.float32)


def test_widening_keeps_states_ranges_and_results_and_reads_back_as_4_bit(tmp_path):
    model = w4a8_model()
    before = find_quantized_weights(model)
    outputs = infer(compile_ir(model), IMAGES)[0]
    assert widen(model) == 2
    after = find_quantized_weights(model)
    assert [w.element_type for w in before] == ["i4", "u4", "i4"] and [w.element_type for w in after] == ["i8", "u8", "i4"]
    for old, new in zip(before, after):
        np.testing.assert_array_equal(old.states, new.states)
        assert (old.low, old.high, old.constant_name, old.consumer) == (new.low, new.high, new.constant_name, new.consumer)
    widened = infer(compile_ir(model), IMAGES)[0]
    assert np.abs(widened - outputs).max() < 0.05 * np.abs(outputs).max()  # the same grid; only the kernels differ
    save_ir(model, tmp_path / "wide.xml")
    reread = read_ir(tmp_path / "wide.xml")
    assert widened_ranges(reread) == {w.constant_name: (w.low, w.high) for w in before[:2]}
    assert [(w.element_type, w.low, w.high) for w in find_quantized_weights(reread)] == [(w.element_type, w.low, w.high) for w in after]
    assert widen(reread) == 0  # nothing 4-bit left on a convolution


def test_a_record_the_states_do_not_fit_is_refused():
    model = w4a8_model()
    widen(model)
    name = find_quantized_weights(model)[0].constant_name
    model.set_rt_info(json.dumps({name: [-1, 1]}), list(WIDENED_RECORD))
    with pytest.raises(EvoquantError, match="leave the 4-bit range"):
        find_quantized_weights(model)
    model.set_rt_info("not json", list(WIDENED_RECORD))
    with pytest.raises(EvoquantError, match="not a record evoquant wrote"):
        find_quantized_weights(model)


def test_settle_storage_follows_its_mode():
    kept = settle_storage(w4a8_model(), IMAGES, "keep")
    assert kept.four_bit == 2 and kept.widened == 0 and kept.difference is not None
    model = w4a8_model()
    forced = settle_storage(model, IMAGES, "widen")
    assert forced.widened == 2 and forced.difference_after <= TOLERANCE and forced.change < 0.05
    assert {w.element_type for w in find_quantized_weights(model)} == {"i8", "u8", "i4"}
    # auto always widens 4-bit 1x1 convolutions (a check that agrees once proves nothing: the defect comes and goes)
    auto = settle_storage(w4a8_model(), IMAGES, "auto")
    assert (auto.pointwise, auto.widened) == (2, 2) and auto.difference_after <= TOLERANCE and "8-bit constants" in auto.warning()
    # ... and other kernels exactly when this machine's OpenVINO computes them differently with several streams
    auto = settle_storage(w4a8_model(kernel=3), IMAGES, "auto")
    assert auto.pointwise == 0 and (auto.widened == 2) == (auto.difference > TOLERANCE) and (auto.warning() is None) == (auto.difference <= TOLERANCE)
    with pytest.raises(EvoquantError, match="weight storage"):
        settle_storage(w4a8_model(), IMAGES, "pack")


def test_models_without_4_bit_convolutions_are_not_checked():
    model = w4a8_model()
    widen(model)
    check = settle_storage(model, IMAGES, "widen")
    assert (check.four_bit, check.difference, check.widened) == (0, None, 0)


def test_refine_writes_through_the_storage_setting(tmp_path):
    from evoquant import refine
    from evoquant.config import RefineConfig

    small = RefineConfig.from_yaml("fast").replace(selection_size=64, verification_size=64, selection_pool=128, progress=False)
    model, reference = tmp_path / "w4.xml", tmp_path / "fp32.xml"
    save_ir(w4a8_model(), model)
    save_ir(w4a8_model(fp32=True), reference)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(4).random((200, 3, 6, 6), dtype=np.float32))
    out = tmp_path / "out.xml"
    result = refine(model, reference=reference, data=str(tmp_path / "data.npz"), output=out, weight_storage="widen", config=small,
                    stages="reconstruct")
    assert result.weight_storage["widened_tensors"] == 2 and result.weight_storage["mode"] == "widen"
    written = find_quantized_weights(read_ir(out))
    assert [w.element_type for w in written] == ["i8", "u8", "i4"]
    assert all(w.low >= -8 and w.high <= 15 and w.states.min() >= w.low and w.states.max() <= w.high for w in written)
    assert {w.element_type for w in find_quantized_weights(read_ir(model))} == {"i4", "u4"}  # the input is untouched
    kept = refine(model, reference=reference, data=str(tmp_path / "data.npz"), output=tmp_path / "kept.xml", weight_storage="keep", config=small,
                  stages="reconstruct")
    assert kept.weight_storage["widened_tensors"] == 0
    assert {w.element_type for w in find_quantized_weights(read_ir(tmp_path / "kept.xml"))} == {"i4", "u4"}
