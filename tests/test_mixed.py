"""Mixed 4/8-bit weights: ``evoquant quantize --weight-bits 4 --ratio R / --int8-layers LIST``."""

from __future__ import annotations

import json
import logging

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

from conftest import calibration_batches, tiny_fp32_model
from test_cli import run_cli
from evoquant.errors import EvoquantError
from evoquant.ir.layers import layer_bias
from evoquant.ir.mixed import layers_in_scope, take_weights
from evoquant.ir.quantize import QuantizeSettings, nncf_quantize
from evoquant.ir.runtime import compile_ir, infer, read_ir
from evoquant.ir.weights import find_quantized_weights
from evoquant.reconstruct.precision import choose_eight_bit
from evoquant.reconstruct.stage import LayerResult


@pytest.fixture(scope="module")
def w4_and_w8():
    """NNCF's 4-bit and 8-bit runs (same target device, same images) of the tiny model."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    items, model = list(calibration_batches()), tiny_fp32_model()  # one model for both runs, as quantize does
    w4 = nncf_quantize(model, items, QuantizeSettings(weight_bits=4))
    w8 = nncf_quantize(model, items, QuantizeSettings(weight_bits=8, target_device="NPU"))
    return w4, w8


def test_a_layer_takes_the_8_bit_states_scale_and_bias_of_nncf_8_bit_run(w4_and_w8):
    w4, w8 = w4_and_w8
    mixed = w4.clone()
    assert take_weights(mixed, w8, ["depthwise"]) == 1
    table, donor, start = find_quantized_weights(mixed), find_quantized_weights(w8), find_quantized_weights(w4)
    assert [w.element_type for w in table] == ["i4", "i8", "i4"]
    assert np.array_equal(table[1].states, donor[1].states) and np.allclose(table[1].scale, donor[1].scale)
    assert np.array_equal(table[0].states, start[0].states) and np.array_equal(table[2].states, start[2].states)
    assert -127 <= table[1].low and table[1].high <= 127 and table[1].high > 7  # refine reads an 8-bit range for it
    x = np.random.default_rng(0).random((16, 3, 8, 8), dtype=np.float32)
    assert np.isfinite(infer(compile_ir(mixed), x)[0]).all()  # the CPU plugin runs i4 and i8 weights side by side
    # and the models it was made from are untouched
    assert [w.element_type for w in find_quantized_weights(w4)] == ["i4", "i4", "i4"]


def _biased_model() -> ov.Model:
    """conv + bias → relu → conv + bias → matmul: NNCF's bias correction moves each bias for its rounding."""
    rng = np.random.default_rng(3)
    x = opset.parameter([-1, 3, 8, 8], np.float32, name="input")
    first = opset.convolution(x, opset.constant(rng.normal(size=(8, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    first.set_friendly_name("first")
    hidden = opset.relu(opset.add(first, opset.constant(rng.normal(size=(1, 8, 1, 1)).astype(np.float32))))
    second = opset.convolution(hidden, opset.constant(rng.normal(size=(8, 8, 3, 3)).astype(np.float32)), [2, 2], [1, 1], [1, 1], [1, 1])
    second.set_friendly_name("second")
    hidden = opset.relu(opset.add(second, opset.constant(rng.normal(size=(1, 8, 1, 1)).astype(np.float32))))
    flat = opset.reshape(hidden, opset.constant(np.array([-1, 128], dtype=np.int64)), False)
    logits = opset.matmul(flat, opset.constant(rng.normal(size=(10, 128)).astype(np.float32) * 0.2), False, True)
    logits.set_friendly_name("fc")
    return ov.Model([logits], [x], "biased")


def test_the_bias_after_the_layer_comes_from_the_8_bit_run_too():
    items, model = list(calibration_batches()), _biased_model()
    w4 = nncf_quantize(model, items, QuantizeSettings(weight_bits=4))
    w8 = nncf_quantize(model, items, QuantizeSettings(weight_bits=8, target_device="NPU"))
    assert not np.allclose(layer_bias(w4, "first"), layer_bias(w8, "first"))  # each run corrected it for its own rounding
    mixed = w4.clone()
    take_weights(mixed, w8, ["first"])
    assert np.allclose(layer_bias(mixed, "first"), layer_bias(w8, "first"))
    assert [w.element_type for w in find_quantized_weights(mixed)] == ["i8", "i4", "i4"]


def test_every_layer_taken_computes_what_nncf_8_bit_model_computes():
    """All layers taken: the 4-bit model becomes NNCF's 8-bit one (same activation quantizers; weights, scales and
    biases taken), so the two compute the same outputs."""
    items, model = list(calibration_batches()), _biased_model()
    w4 = nncf_quantize(model, items, QuantizeSettings(weight_bits=4))
    w8 = nncf_quantize(model, items, QuantizeSettings(weight_bits=8, target_device="NPU"))
    x = np.random.default_rng(1).random((32, 3, 8, 8), dtype=np.float32)
    assert not np.allclose(infer(compile_ir(w4, f32=True), x)[0], infer(compile_ir(w8, f32=True), x)[0], atol=1e-4)
    take_weights(w4, w8, [w.consumer for w in find_quantized_weights(w4)])
    assert np.allclose(infer(compile_ir(w4, f32=True), x)[0], infer(compile_ir(w8, f32=True), x)[0], atol=1e-5)


def test_models_of_different_graphs_are_not_mixed(w4_and_w8):
    w4, _ = w4_and_w8
    other = nncf_quantize(tiny_fp32_model(), list(calibration_batches()), QuantizeSettings(weight_bits=8, target_device="NPU", ignored_scope=("fc",)))
    with pytest.raises(EvoquantError, match="different weights"):
        take_weights(w4.clone(), other, ["conv1"])


def test_scope_entries_name_layers_by_name_pattern_and_type(w4_and_w8):
    table = find_quantized_weights(w4_and_w8[0])
    assert layers_in_scope(table, ["fc"], "--int8-layers") == ["fc"]
    assert layers_in_scope(table, ["type:GroupConvolution", "re:conv"], "--int8-layers") == ["conv1", "depthwise"]
    for entry in ("nosuch", "re:zzz", "type:Softmax"):
        with pytest.raises(EvoquantError, match="--int8-layers"):
            layers_in_scope(table, [entry], "--int8-layers")


def _layer(name: str, relative: float | None, skipped: str | None = None) -> LayerResult:
    return LayerResult(name, 10, 1.0, relative, 0, 1, skipped=skipped, target_energy=None if relative is None else 1.0)


def test_the_budget_goes_to_the_most_error_per_weight_and_is_never_exceeded():
    sizes = {"first": 100, "dw": 50, "big": 1000, "fc": 850}  # 2,000 weights
    layers = [_layer("first", 0.02), _layer("dw", 0.03), _layer("big", 0.2), _layer("fc", None, skipped="unsupported")]
    # 10 % = 200 weights: big has the most error but 0.2/1000 per weight < 0.02/100 < 0.03/50
    choice = choose_eight_bit(sizes, 0.9, layers=layers)
    assert choice.layers == ("first", "dw") and choice.four_bit_share == pytest.approx(1 - 150 / 2000)
    assert choice.unscored == ("fc",)
    # a larger budget takes big too; an unscored layer never, whatever the budget
    assert choose_eight_bit(sizes, 0.0, layers=layers).layers == ("first", "dw", "big")
    # a fixed layer counts against the budget
    fixed = choose_eight_bit(sizes, 0.9, fixed=["fc"], layers=layers)
    assert fixed.layers == ("fc",) and fixed.four_bit_share == pytest.approx(1 - 850 / 2000)
    # no budget: nothing
    assert choose_eight_bit(sizes, 1.0, layers=layers).layers == ()


def test_a_layer_the_fit_made_exact_is_not_given_8_bits():
    choice = choose_eight_bit({"a": 10, "b": 10}, 0.0, layers=[_layer("a", 0.0), _layer("b", 0.1)])
    assert choice.layers == ("b",)


def test_quantize_ratio_writes_a_mixed_model_and_reports_it(tiny_irs, tmp_path):
    out, report = tmp_path / "mixed.xml", tmp_path / "quantize.json"
    code, stdout, stderr = run_cli("quantize", str(tiny_irs.fp32), "-c", str(tiny_irs.data), "--weight-bits", "4", "--ratio", "0.5",
                                   "--subset-size", "32", "--weight-storage", "keep", "--report", str(report), "-o", str(out))
    assert code == 0, stderr
    table = find_quantized_weights(read_ir(out))
    data = json.loads(report.read_text())
    assert "layer(s) at 8 bits" in stdout and data["ratio"] == 0.5
    assert set(data["sensitivity"]) == {w.consumer for w in table} and all(v is not None for v in data["sensitivity"].values())
    eight = {w.consumer for w in table if w.element_type == "i8"}
    assert eight == set(data["int8_layers"]) and eight
    assert {w.element_type for w in table if w.consumer not in eight} == {"i4"}
    share = sum(w.size for w in table if w.element_type == "i4") / sum(w.size for w in table)
    assert share == pytest.approx(data["four_bit_share"]) and share >= 0.5
    assert ov.Core().compile_model(read_ir(out), "CPU")


def test_int8_layers_are_8_bit_without_a_ratio(tiny_irs, tmp_path):
    out = tmp_path / "dw8.xml"
    code, stdout, stderr = run_cli("quantize", str(tiny_irs.fp32), "-c", str(tiny_irs.data), "--weight-bits", "4", "--int8-layers", "type:GroupConvolution",
                                   "--subset-size", "32", "--weight-storage", "keep", "-o", str(out))
    assert code == 0, stderr
    assert [w.element_type for w in find_quantized_weights(read_ir(out))] == ["i4", "i8", "i4"]


@pytest.mark.parametrize("flags, message", [
    (["--ratio", "0.9"], "--weight-bits 4"),
    (["--weight-bits", "4", "--ratio", "1.5"], "between 0 and 1"),
    (["--weight-bits", "4", "--int8-layers", "nosuch"], "no quantized layer is named"),
])
def test_bad_mixed_precision_flags_are_one_line_and_write_nothing(tiny_irs, tmp_path, flags, message):
    out = tmp_path / "bad.xml"
    code, _, stderr = run_cli("quantize", str(tiny_irs.fp32), "-c", str(tiny_irs.data), "--subset-size", "16", *flags, "-o", str(out))
    assert code == 2 and message in stderr and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert not out.exists() and not out.with_suffix(".bin").exists()


def test_a_user_saved_model_quantizes_mixed_and_refines_on_each_layers_own_grid(tmp_path):
    """Saved as users save it (dynamic input, FP16 weights): quantize --ratio, then refine keeps each weight on
    its own grid (8-bit layers in [-127, 127], 4-bit ones in [-7, 7])."""
    fp32 = tiny_fp32_model()
    fp32.get_parameters()[0].set_partial_shape(ov.PartialShape.dynamic(4))
    fp32.validate_nodes_and_infer_types()
    ov.save_model(fp32, tmp_path / "fp32.xml")  # compress_to_fp16 defaults to True
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(5).random((400, 3, 8, 8), dtype=np.float32))
    mixed = tmp_path / "mixed.xml"
    code, stdout, stderr = run_cli("quantize", str(tmp_path / "fp32.xml"), "-c", str(tmp_path / "data.npz"), "--input-shape", "1,3,8,8", "--weight-bits", "4",
                                   "--ratio", "0.6", "--subset-size", "32", "--report", str(tmp_path / "q.json"), "-o", str(mixed))
    assert code == 0, stderr
    eight = set(json.loads((tmp_path / "q.json").read_text())["int8_layers"])
    table = find_quantized_weights(read_ir(mixed))
    assert eight and [w.high > 7 for w in table] == [w.consumer in eight for w in table]  # (4-bit states may sit in 8-bit constants: --weight-storage auto)
    out = tmp_path / "refined.xml"
    code, _, stderr = run_cli("refine", str(mixed), "-r", str(tmp_path / "fp32.xml"), "--data", str(tmp_path / "data.npz"), "--input-shape", "1,3,8,8",
                              "-o", str(out), "-q", "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "--engine", "plain")
    assert code == 0, stderr
    refined = find_quantized_weights(read_ir(out))
    for before, after in zip(table, refined):
        assert (before.low, before.high) == (after.low, after.high) and before.low <= after.states.min() and after.states.max() <= before.high
