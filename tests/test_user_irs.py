"""IRs as users save them: ``convert_model`` defaults (fully dynamic input), ``save_model`` defaults (FP16
weights), ``model.reshape``'s flatten rewrite, and W4A8 (i4 weights) from ``evoquant quantize``."""

from __future__ import annotations

import logging

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

from conftest import INPUT_SHAPE, calibration_batches, tiny_fp32_model
from test_cli import run_cli
from evoquant.ir.ranges import activation_quantizers
from evoquant.ir.runtime import read_ir
from evoquant.ir.weights import find_quantized_weights, find_unmatched_layers


def _dynamic(model: ov.Model) -> ov.Model:
    """The model with a fully dynamic input, as ov.convert_model(m, example_input=x) saves it."""
    copy = model.clone()
    copy.get_parameters()[0].set_partial_shape(ov.PartialShape.dynamic(4))
    copy.validate_nodes_and_infer_types()
    return copy


def _input_shape(path) -> str:
    return str(read_ir(path).inputs[0].get_partial_shape())


@pytest.fixture(scope="module")
def user_irs(tmp_path_factory):
    """A dynamic-shape FP32 reference saved with FP16 weights (both user defaults), its NNCF INT8 and
    W4A8 models (dynamic too), and fitness images."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    folder = tmp_path_factory.mktemp("user")
    fp32 = _dynamic(tiny_fp32_model())
    ov.save_model(fp32, folder / "fp32.xml")  # compress_to_fp16 defaults to True
    dataset = nncf.Dataset(calibration_batches())
    ov.save_model(nncf.quantize(_dynamic(tiny_fp32_model()), dataset, subset_size=32), folder / "int8.xml", compress_to_fp16=False)
    rng = np.random.default_rng(5)
    np.savez(folder / "data.npz", x=rng.random((400, *INPUT_SHAPE), dtype=np.float32))
    return folder


def test_saved_reference_really_is_fp16_and_dynamic(user_irs):
    model = read_ir(user_irs / "fp32.xml")
    assert "?" in _input_shape(user_irs / "fp32.xml") and "?" in _input_shape(user_irs / "int8.xml")
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16 for op in model.get_ordered_ops())


def test_dynamic_model_without_shape_says_how_to_give_it(user_irs):
    code, _, stderr = run_cli("refine", str(user_irs / "int8.xml"), "-r", str(user_irs / "fp32.xml"), "--data", "fractal", "-q")
    assert code == 2 and "--input-shape" in stderr and "Traceback" not in stderr


def test_input_shape_that_does_not_fit_is_one_line(user_irs):
    code, _, stderr = run_cli("refine", str(user_irs / "int8.xml"), "-r", str(user_irs / "fp32.xml"), "--input-shape", "1,3,8", "-q", "--data", "fractal")
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr


@pytest.mark.parametrize("shape_flag", [["--input-shape", "[1,3,8,8]"], []])  # given, or fixed by the .npz
def test_refine_dynamic_ir_keeps_its_shape_and_changes_only_weights(user_irs, tmp_path, shape_flag):
    out = tmp_path / "refined.xml"
    # the input quantizer's range is kept: on this random-weight model any change of it (x0.999 as well as
    # x1.0016, what covering [0, 1] takes) raises NNCF's KL by 10-17 % and the 128-row classifier fit flips
    # with it, so whether refine beats the start would be a coin toss; test_ranges covers the input rule
    config = tmp_path / "keep_input.yaml"
    config.write_text("ranges:\n  cover_input: false\n")
    code, stdout, stderr = run_cli("refine", str(user_irs / "int8.xml"), "-r", str(user_irs / "fp32.xml"), "--data", str(user_irs / "data.npz"),
                                   *shape_flag, "-o", str(out), "-q", "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128",
                                   "--engine", "plain", "--config", str(config))
    assert code == 0, stderr
    assert _input_shape(out) == _input_shape(user_irs / "int8.xml") == "[?,?,?,?]"
    before, after = read_ir(user_irs / "int8.xml"), read_ir(out)
    assert [op.get_type_name() for op in before.get_ordered_ops()] == [op.get_type_name() for op in after.get_ordered_ops()]
    weights_before, weights_after = find_quantized_weights(before), find_quantized_weights(after)
    assert [w.constant_name for w in weights_before] == [w.constant_name for w in weights_after]
    # every constant but the weights and the activation quantizers' ranges is byte-identical; each range is
    # NNCF's times one factor of at least 1 (the ranges stage widens them)
    assert _other_constants(before) == _other_constants(after)
    widened = [factor for factor in _range_factors(before, after).values() if factor != 1.0]
    assert widened and min(widened) > 1.0


def _fixed_batch_pair(user_irs, name: str, *, pinned: bool = False):
    """The user_irs pair saved after ``model.reshape([1, 3, 8, 8])`` (a fixed batch of one); ``pinned``: the
    quantized model's flatten also reshapes to a constant ``[1, 256]``, as ``ov.convert_model(m, input=[1, ...])``
    can write it, so no other batch fits."""
    folder = user_irs / name
    folder.mkdir(exist_ok=True)
    for kind in ("fp32", "int8"):
        model = read_ir(user_irs / f"{kind}.xml")
        model.reshape([1, *INPUT_SHAPE])
        if pinned and kind == "int8":
            flatten = next(op for op in model.get_ordered_ops() if op.get_type_name() == "Reshape")
            flatten.input(1).replace_source_output(opset.constant(np.array([1, 256], dtype=np.int64)).output(0))
            model.validate_nodes_and_infer_types()
        ov.save_model(model, folder / f"{kind}.xml", compress_to_fp16=False)
    return folder / "int8.xml", folder / "fp32.xml"


def test_refine_a_fixed_batch_ir_keeps_its_batch(user_irs, tmp_path):
    """``model.reshape([1, ...])`` fixes the batch; evoquant scores batches of 64-256 images (before: a
    traceback 'got [256,3,8,8] expecting [1,3,8,8]'), and the written IR keeps the user's batch of one."""
    int8, fp32 = _fixed_batch_pair(user_irs, "fixed")
    out = tmp_path / "refined.xml"
    code, _, stderr = run_cli("refine", str(int8), "-r", str(fp32), "--data", "fractal", "-o", str(out), "-q", "--stages", "ranges,reconstruct,evolve",
                              "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "--generations", "2", "--jobs", "2")
    assert code == 0, stderr
    assert _input_shape(out) == _input_shape(int8) == "[1,3,8,8]"
    before, after = find_quantized_weights(read_ir(int8)), find_quantized_weights(read_ir(out))
    assert any(not np.array_equal(b.states, a.states) for b, a in zip(before, after))


def test_a_graph_that_pins_the_batch_is_one_line(user_irs, tmp_path):
    int8, fp32 = _fixed_batch_pair(user_irs, "pinned", pinned=True)
    out = tmp_path / "refined.xml"
    code, _, stderr = run_cli("refine", str(int8), "-r", str(fp32), "--data", "fractal", "-o", str(out), "-q")
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert "pins it" in stderr and "dynamic batch" in stderr and not out.exists()


def _other_constants(model) -> list[bytes]:
    weights = {w.constant_name for w in find_quantized_weights(model)}
    bounds = {node.input_value(port).get_node().get_friendly_name() for node in activation_quantizers(model) for port in (1, 2, 3, 4)}
    return [np.asarray(op.get_data()).tobytes() for op in model.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_friendly_name() not in weights | bounds]


def _range_factors(before, after) -> dict[str, float]:
    """Per activation quantizer (by name), the one factor its four bounds were multiplied by (asserted)."""
    factors = {}
    theirs = {node.get_friendly_name(): node for node in activation_quantizers(after)}
    for node in activation_quantizers(before):
        old = [np.asarray(node.input_value(port).get_node().get_data(), dtype=np.float64) for port in (1, 2, 3, 4)]
        new = [np.asarray(theirs[node.get_friendly_name()].input_value(port).get_node().get_data(), dtype=np.float64) for port in (1, 2, 3, 4)]
        widest = max(range(4), key=lambda k: float(np.max(np.abs(old[k]))))
        scale = float(np.max(np.abs(old[widest])))
        factor = float(np.max(np.abs(new[widest]))) / scale
        for a, b in zip(old, new):
            np.testing.assert_allclose(b, a * factor, rtol=1e-5, atol=1e-7 * scale)
        factors[node.get_friendly_name()] = factor
    return factors


def test_refine_without_the_ranges_stage_changes_only_weights(user_irs, tmp_path):
    out = tmp_path / "refined.xml"
    code, _, stderr = run_cli("refine", str(user_irs / "int8.xml"), "-r", str(user_irs / "fp32.xml"), "--data", str(user_irs / "data.npz"), "--input-shape", "1,3,8,8",
                              "-o", str(out), "-q", "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "--stages", "reconstruct,compose")
    assert code == 0, stderr
    before, after = read_ir(user_irs / "int8.xml"), read_ir(out)
    assert _other_constants(before) == _other_constants(after)
    assert set(_range_factors(before, after).values()) == {1.0}


def test_quantize_and_synth_take_a_dynamic_model(user_irs, tmp_path):
    out = tmp_path / "int8.xml"
    code, stdout, stderr = run_cli("quantize", str(user_irs / "fp32.xml"), "-c", "fractal", "--input-shape", "1,3,8,8", "--subset-size", "16", "-o", str(out))
    assert code == 0, stderr
    assert _input_shape(out) == "[?,?,?,?]" and len(find_quantized_weights(read_ir(out))) == 3
    code, _, stderr = run_cli("synth", "-s", "fractal", "-n", "8", "--like", str(user_irs / "fp32.xml"), "--input-shape", "1,3,8,8", "-o", str(tmp_path / "s.npz"))
    assert code == 0, stderr
    assert np.load(tmp_path / "s.npz")["x"].shape == (8, *INPUT_SHAPE)


def test_w4a8_quantize_makes_i4_weights_that_refine_improves(user_irs, tmp_path):
    w4 = tmp_path / "w4a8.xml"
    code, stdout, stderr = run_cli("quantize", str(user_irs / "fp32.xml"), "-c", str(user_irs / "data.npz"), "--weight-bits", "4", "--subset-size", "32", "-o", str(w4))
    assert code == 0, stderr
    assert "W4A8" in stdout and "target NPU" in stdout
    table = find_quantized_weights(read_ir(w4))
    assert {w.element_type for w in table} == {"i4"} and all(w.low >= -8 and w.high <= 7 for w in table)
    assert ov.Core().compile_model(read_ir(w4), "CPU")  # the CPU plugin runs it
    out = tmp_path / "refined.xml"
    code, stdout, stderr = run_cli("refine", str(w4), "-r", str(user_irs / "fp32.xml"), "--data", str(user_irs / "data.npz"), "-o", str(out), "-q",
                                   "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "--engine", "plain")
    assert code == 0, stderr
    refined = find_quantized_weights(read_ir(out))
    assert {w.element_type for w in refined} == {"i4"}
    moved = sum(int(np.count_nonzero(a.states != b.states)) for a, b in zip(table, refined))
    assert moved > 0 and "refined:" in stdout
    assert all(a.low <= b.states.min() and b.states.max() <= a.high for a, b in zip(table, refined))


def test_widened_w4a8_stays_on_its_4_bit_grid_through_refine(user_irs, tmp_path):
    w4 = tmp_path / "w4a8.xml"
    code, stdout, stderr = run_cli("quantize", str(user_irs / "fp32.xml"), "-c", str(user_irs / "data.npz"), "--weight-bits", "4", "--subset-size", "32",
                                   "--weight-storage", "widen", "-o", str(w4))
    assert code == 0, stderr
    table = find_quantized_weights(read_ir(w4))
    assert "2 of them 4-bit states in 8-bit constants" in stdout
    assert [w.element_type for w in table] == ["i8", "i8", "i4"]  # the convolutions widened, the MatMul not
    assert all(-8 <= w.low and w.high <= 7 for w in table)
    out = tmp_path / "refined.xml"
    code, _, stderr = run_cli("refine", str(w4), "-r", str(user_irs / "fp32.xml"), "--data", str(user_irs / "data.npz"), "-o", str(out), "-q",
                              "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "--engine", "plain")
    assert code == 0, stderr
    refined = find_quantized_weights(read_ir(out))
    assert [w.element_type for w in refined] == ["i8", "i8", "i4"]
    assert all((a.low, a.high) == (b.low, b.high) and a.low <= b.states.min() and b.states.max() <= a.high for a, b in zip(table, refined))
    code, _, stderr = run_cli("refine", str(w4), "-r", str(user_irs / "fp32.xml"), "--data", str(user_irs / "data.npz"), "-o", str(tmp_path / "x.xml"),
                              "--weight-storage", "pack")
    assert code == 2 and "invalid choice" in stderr and not (tmp_path / "x.xml").exists()


def test_w4_on_the_cpu_target_is_refused_in_one_line(user_irs, tmp_path):
    code, _, stderr = run_cli("quantize", str(user_irs / "fp32.xml"), "-c", "fractal", "--input-shape", "1,3,8,8", "--weight-bits", "4", "--target-device", "CPU", "-o", str(tmp_path / "x.xml"))
    assert code == 2 and "NPU" in stderr and not (tmp_path / "x.xml").exists()


def test_reshape_flatten_pattern_keeps_every_weight():
    """model.reshape's SmartReshape makes the flatten read ShapeOf of the classifier's dequantized weight:
    the weight must still be found, and nothing weighted may go unreported."""
    import nncf

    nncf.set_log_level(logging.ERROR)
    quantized = nncf.quantize(tiny_fp32_model(), nncf.Dataset(calibration_batches()), subset_size=32)
    fc = next(op for op in quantized.get_ordered_ops() if op.get_friendly_name() == "fc")
    weight_output = fc.input_value(1)
    flatten = fc.input_value(0).get_node()
    assert flatten.get_type_name() == "Reshape"
    # flatten to [batch, weight_shape[1]] read off ShapeOf(weight), as SmartReshape writes it
    columns = opset.gather(opset.shape_of(weight_output), opset.constant(np.array([1], dtype=np.int64)), opset.constant(np.int64(0)))
    target = opset.concat([opset.constant(np.array([-1], dtype=np.int64)), columns], 0)
    flatten.input(1).replace_source_output(target.output(0))
    quantized.validate_nodes_and_infer_types()
    table = find_quantized_weights(quantized)
    assert [w.consumer for w in table] == ["conv1", "depthwise", "fc"]
    assert find_unmatched_layers(quantized, table) == []


def test_unquantized_layer_is_reported_with_its_reason(tmp_path):
    import nncf

    nncf.set_log_level(logging.ERROR)
    quantized = nncf.quantize(tiny_fp32_model(), nncf.Dataset(calibration_batches()), subset_size=32, ignored_scope=nncf.IgnoredScope(names=["fc"]))
    table = find_quantized_weights(quantized)
    unmatched = find_unmatched_layers(quantized, table)
    assert [(layer.name, layer.port) for layer in unmatched] == [("fc", 1)] and "not quantized" in unmatched[0].reason
    ov.save_model(quantized, tmp_path / "partial.xml", compress_to_fp16=False)
    code, stdout, _ = run_cli("inspect", str(tmp_path / "partial.xml"))
    assert code == 0 and "not refined: 1" in stdout and "fc" in stdout


def _nhwc_normalised_model() -> ov.Model:
    """A model that takes NHWC inputs normalised ImageNet-style: (x - mean) / scale is *not* in the IR."""
    rng = np.random.default_rng(3)
    x = opset.parameter([-1, 8, 8, 3], np.float32, name="input")
    nchw = opset.transpose(x, opset.constant(np.array([0, 3, 1, 2], dtype=np.int64)))
    conv = opset.convolution(nchw, opset.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    flat = opset.reshape(opset.relu(conv), opset.constant(np.array([-1, 256], dtype=np.int64)), False)
    logits = opset.matmul(flat, opset.constant(rng.normal(size=(10, 256)).astype(np.float32) * 0.2), False, True)
    return ov.Model([logits], [x], "nhwc")


NORMALISE = ["--input-range", "0,255", "--mean-values", "[123.675,116.28,103.53]", "--scale-values", "[58.395,57.12,57.375]", "--layout", "input[NHWC]"]


def test_mean_scale_and_layout_reach_the_model_as_ovc_spells_them(tmp_path):
    from evoquant.config import RefineConfig
    from evoquant.data.preprocess import InputSpec

    spec = InputSpec((0.0, 255.0), (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "NHWC")
    images01 = np.random.default_rng(0).random((4, 3, 8, 8), dtype=np.float32)
    out = spec.apply(images01 * 255)
    np.testing.assert_allclose(out[:, :, :, 1], (images01[:, 1] * 255 - 116.28) / 57.12, rtol=1e-5)
    assert out.shape == (4, 8, 8, 3) and spec.source_shape((8, 8, 3)) == (3, 8, 8)
    # the same settings from YAML
    (tmp_path / "c.yaml").write_text("mean_values: [123.675, 116.28, 103.53]\nscale_values: [58.395, 57.12, 57.375]\nlayout: NHWC\nvalue_range: [0, 255]\n")
    assert RefineConfig.from_yaml(tmp_path / "c.yaml").input_spec == spec
    from evoquant.api import _fitness_batches

    config = RefineConfig.from_yaml(tmp_path / "c.yaml").replace(selection_size=16, verification_size=16, selection_pool=0)
    _, pool, verification, _ = _fitness_batches("noise", config, (8, 8, 3), pooled=False)
    assert pool.images.shape == (16, 8, 8, 3) and -2.2 < pool.images.min() < -1.5 and 2.0 < pool.images.max() < 2.7


def test_quantize_and_refine_an_nhwc_normalised_model_through_the_cli(tmp_path):
    ov.save_model(_nhwc_normalised_model(), tmp_path / "fp32.xml")
    code, _, stderr = run_cli("quantize", str(tmp_path / "fp32.xml"), "-c", "fractal", "--subset-size", "32", "--input-shape", "1,8,8,3", *NORMALISE, "-o", str(tmp_path / "int8.xml"))
    assert code == 0, stderr
    code, stdout, stderr = run_cli("refine", str(tmp_path / "int8.xml"), "-r", str(tmp_path / "fp32.xml"), "--input-shape", "1,8,8,3", *NORMALISE, "--stages", "reconstruct",
                                   "--selection-size", "64", "--verification-size", "64", "--selection-pool", "128", "-q", "-o", str(tmp_path / "refined.xml"))
    assert code == 0 and "agrees with its reference on only" not in stderr, stderr
    for flags, words in ((["--layout", "NCWH"], "--layout must be"), (["--mean-values", "1,2"], "--mean-values has 2 values"), (["--scale-values", "[0,1,1]"], "positive")):
        code, _, stderr = run_cli("refine", str(tmp_path / "int8.xml"), "-r", str(tmp_path / "fp32.xml"), "--input-shape", "1,8,8,3", "--layout", "NHWC", *flags, "-q")
        assert code == 2 and words in stderr and stderr.count("\n") == 1, stderr


def test_a_model_with_two_outputs_is_refined_on_both(tmp_path):
    """Logits and a feature map: the objective (auto: mse) covers every output, and both survive the write."""
    import nncf

    rng = np.random.default_rng(4)
    x = opset.parameter([-1, *INPUT_SHAPE], np.float32, name="input")
    conv = opset.relu(opset.convolution(x, opset.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1]))
    flat = opset.reshape(conv, opset.constant(np.array([-1, 256], dtype=np.int64)), False)
    logits = opset.matmul(flat, opset.constant(rng.normal(size=(10, 256)).astype(np.float32) * 0.2), False, True)
    model = ov.Model([logits, conv], [x], "two_outputs")
    ov.save_model(model, tmp_path / "fp32.xml", compress_to_fp16=False)
    nncf.set_log_level(logging.ERROR)
    ov.save_model(nncf.quantize(model, nncf.Dataset(calibration_batches()), subset_size=32), tmp_path / "int8.xml", compress_to_fp16=False)
    code, stdout, stderr = run_cli("refine", str(tmp_path / "int8.xml"), "-r", str(tmp_path / "fp32.xml"), "--selection-size", "64", "--verification-size", "64",
                                   "--selection-pool", "128", "-q", "-o", str(tmp_path / "refined.xml"), "--report", str(tmp_path / "r.json"))
    assert code == 0, stderr
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["objective"] == "mse" and report["verification_after"]["fitness"] <= report["verification_before"]["fitness"]
    assert len(read_ir(tmp_path / "refined.xml").outputs) == 2


@pytest.mark.parametrize("model_shape, data_shape, expected", [
    ([-1, 3, -1, -1], (1, 32, 32), (3, 32, 32)),  # a grey GAN for a colour model as convert_model leaves it
    ([-1, 1, -1, -1], (3, 16, 16), (1, 16, 16)),
    ([-1, -1, -1, 3], (32, 32, 1), (32, 32, 3)),  # NHWC: the channels are last
    ([-1, -1, -1, -1], (1, 8, 8), (1, 8, 8)),
])
def test_the_data_fixes_a_dynamic_shape_up_to_the_channels_sources_adapt(model_shape, data_shape, expected):
    from evoquant.ir.runtime import input_shape

    parameter = opset.parameter(ov.PartialShape(model_shape), ov.Type.f32)
    model = ov.Model([opset.relu(parameter)], [parameter])
    assert input_shape(model, data_shape=data_shape) == expected


def test_data_with_other_channels_than_one_or_three_does_not_fix_the_shape():
    from evoquant.errors import EvoquantError
    from evoquant.ir.runtime import input_shape

    parameter = opset.parameter(ov.PartialShape([-1, 3, -1, -1]), ov.Type.f32)
    with pytest.raises(EvoquantError, match="--input-shape"):
        input_shape(ov.Model([opset.relu(parameter)], [parameter]), data_shape=(4, 32, 32))


def test_demo_on_a_dynamic_shape_zoo_model_with_fractal_data(user_irs, tmp_path, monkeypatch):
    """The families are saved as users save them ([?,3,?,?]); a fractal does not fix that shape, so the demo
    gives refine the zoo model's input shape (before: 'input shape is dynamic' on --source fractal)."""
    from types import SimpleNamespace

    from evoquant import demo, zoo

    rng = np.random.default_rng(7)
    heldout = (rng.random((40, *INPUT_SHAPE), dtype=np.float32), rng.integers(0, 10, size=40))
    built = SimpleNamespace(name="family", fp32_xml=user_irs / "fp32.xml", int8_xml=user_irs / "int8.xml", meta={})
    monkeypatch.setattr(demo, "resolve_models", lambda models: ["family"])
    monkeypatch.setattr(zoo, "input_shape_of", lambda name: INPUT_SHAPE)
    monkeypatch.setattr(zoo, "mnist_split", lambda shape: (None, None, *heldout))
    monkeypatch.setattr(zoo, "build", lambda name, **kwargs: built)
    results = demo.run_demo(models="family", preset="fast", source="fractal", output_dir=str(tmp_path), progress=False, echo=lambda *_: None)
    assert results["family"].heldout_after is not None
    assert "?" in _input_shape(tmp_path / "family_refined.xml")
