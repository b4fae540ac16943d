"""evoquant.analyze / `evoquant analyze`: the error split into weights, activations and layers."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest

from conftest import INPUT_SHAPE, ops_by_name, tiny_fp32_model
from evoquant import EvoquantError, analyze
from evoquant.ir.analysis import activation_quantizer_names, with_fp32_weights, without_activation_quantizers
from evoquant.ir.runtime import read_ir
from test_cli import run_cli


@pytest.mark.parametrize("form", ["int8", "fakequantize"])
def test_quantization_taken_out_piece_by_piece(tiny_irs, form):
    result = analyze(getattr(tiny_irs, form), reference=tiny_irs.fp32, data=tiny_irs.data, images=64)
    assert result.metric == "kl" and result.images == 64
    assert result.weights == result.weights_replaced == 3 and result.activation_quantizers >= 3
    assert result.quantized > 0
    # nothing quantized is the reference itself: the edits put back exactly its weights
    assert result.nothing_quantized < 1e-6 * max(result.quantized, 1e-3)
    # each part alone is an error of its own, and the parts are not the whole
    assert result.fp32_weights > 0 and result.no_activation_quantizers > 0
    assert result.fp32_weights != pytest.approx(result.quantized) and result.no_activation_quantizers != pytest.approx(result.quantized)
    assert [layer.layer for layer in result.layers] == ["conv1", "depthwise", "fc"]
    assert all(layer.error_fp32 is not None and layer.error_fp32 != pytest.approx(result.quantized) for layer in result.layers)
    assert len(result.activations) == result.activation_quantizers
    assert all(quantizer.error_without != pytest.approx(result.quantized) for quantizer in result.activations)


def test_edits_leave_only_what_they_say(tiny_irs):
    reference = read_ir(tiny_irs.fp32)
    model, replaced = with_fp32_weights(read_ir(tiny_irs.int8), reference, only=1)
    assert replaced == 1
    depthwise = ops_by_name(model)["depthwise"].input_value(1).get_node()
    assert depthwise.get_type_name() == "Constant" and np.array_equal(depthwise.get_data(), ops_by_name(reference)["depthwise"].input_value(1).get_node().get_data())
    assert ops_by_name(model)["conv1"].input_value(1).get_node().get_type_name() == "Multiply"  # the others still dequantize their states
    model, removed = without_activation_quantizers(read_ir(tiny_irs.int8))
    kinds = {op.get_type_name() for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize"}
    assert removed >= 3 and not kinds
    names = activation_quantizer_names(read_ir(tiny_irs.int8))
    model, removed = without_activation_quantizers(read_ir(tiny_irs.int8), only=names[1])
    assert removed == 1 and activation_quantizer_names(model) == names[:1] + names[2:]


def test_a_weight_its_states_were_not_rounded_from_is_not_put_back(tiny_irs, tmp_path):
    """SmoothQuant rescales a weight and its activation: the FP32 weight is not what the states stand for."""
    model = tiny_fp32_model()
    fc = ops_by_name(model)["fc"]
    rescaled = ov.opset13.constant(fc.input_value(1).get_node().get_data() * 3.0)
    fc.input(1).replace_source_output(rescaled.output(0))
    ov.save_model(model, tmp_path / "other.xml", compress_to_fp16=False)
    result = analyze(tiny_irs.int8, reference=tmp_path / "other.xml", data=tiny_irs.data, images=32)
    assert result.weights_replaced == 2
    fc_layer = next(layer for layer in result.layers if layer.layer == "fc")
    assert fc_layer.error_fp32 is None and "states" in fc_layer.reason


def test_bad_inputs_are_one_line(tiny_irs):
    with pytest.raises(EvoquantError, match="itself quantized"):
        analyze(tiny_irs.int8, reference=tiny_irs.int8, data=tiny_irs.data, images=16)
    with pytest.raises(EvoquantError, match="no quantized weight|not quantized|quantized weight"):
        analyze(tiny_irs.fp32, reference=tiny_irs.fp32, data=tiny_irs.data, images=16)
    with pytest.raises(EvoquantError, match="holds 400 images"):
        analyze(tiny_irs.int8, reference=tiny_irs.fp32, data=str(tiny_irs.data), images=500)
    with pytest.raises(EvoquantError, match="shape"):
        analyze(tiny_irs.int8, reference=tiny_irs.fp32, data=np.zeros((8, 1, 8, 8), np.float32), images=8)


def test_cli_prints_the_split_and_writes_a_report(tiny_irs, tmp_path):
    report = tmp_path / "analysis.json"
    code, out, err = run_cli("analyze", str(tiny_irs.int8), "-r", str(tiny_irs.fp32), "--data", str(tiny_irs.data), "-n", "32", "--report", str(report), "-q")
    assert code == 0, err
    assert "FP32 weights (3 of 3): activations only" in out and "depthwise" in out
    data = json.loads(report.read_text())
    assert data["images"] == 32 and len(data["layers"]) == 3 and data["weights_replaced"] == 3
    code, _, err = run_cli("analyze", str(tiny_irs.int8), "-r", str(tmp_path / "missing.xml"), "-q")
    assert code != 0 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    code, out, _ = run_cli("analyze", "--help")
    assert code == 0 and "examples:" in out and "--ignored-scope" in out


def test_user_saved_reference(tmp_path):
    """An FP16-compressed, dynamic-shape reference (ov.save_model / convert_model defaults)."""
    import logging

    import nncf

    from conftest import calibration_batches

    nncf.set_log_level(logging.ERROR)
    fp32 = tiny_fp32_model()
    fp32.reshape({0: ov.PartialShape([-1, -1, -1, -1])})
    ov.save_model(fp32, tmp_path / "fp32.xml")  # FP16 weights
    ov.save_model(nncf.quantize(tiny_fp32_model(), nncf.Dataset(calibration_batches()), subset_size=32), tmp_path / "int8.xml", compress_to_fp16=False)
    images = np.random.default_rng(3).random((32, *INPUT_SHAPE), dtype=np.float32)
    result = analyze(tmp_path / "int8.xml", reference=tmp_path / "fp32.xml", data=images, images=32)
    assert result.weights_replaced == 3
    assert result.nothing_quantized < 0.01 * result.quantized  # FP16 rounding of the reference's weights only


def test_fp16_weights_behind_fakequantize_are_weights_not_activations(tiny_irs):
    """Older tools' FP16 IRs (POT): Constant(f16) -> Convert -> FakeQuantize is a weight's quantizer, and
    removing the activation quantizers must leave it."""
    model = read_ir(tiny_irs.fakequantize)
    names = activation_quantizer_names(model)
    weight_fq = [op for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() == "Constant"]
    assert len(weight_fq) == 3
    for op in weight_fq:
        half = ov.opset13.constant(op.input_value(0).get_node().get_data().astype(np.float16))
        op.input(0).replace_source_output(ov.opset13.convert(half, ov.Type.f32).output(0))
    model.validate_nodes_and_infer_types()
    assert activation_quantizer_names(model) == names
    total = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops())
    model, removed = without_activation_quantizers(model)
    assert removed == total - 3 and sum(op.get_type_name() == "FakeQuantize" for op in model.get_ordered_ops()) == 3
