"""Real architecture families, saved as users save them: a ResNet (basic blocks, strided shortcuts), a
MobileNetV3 (depthwise, squeeze-excitation, hard-swish) and a ViT (patch embedding, attention, LayerNorm,
GELU), the zoo's plain-torch architectures (:mod:`evoquant.families`) at tiny width with seeded random weights, converted with
``ov.convert_model(m, example_input=x)`` (a fully dynamic input shape) and saved with ``ov.save_model``'s
defaults (FP16-compressed weights). Each is quantized by ``evoquant quantize`` at W8A8 and W4A8 and
refined through the CLI: every weighted layer is refined or reported, the IR keeps its dynamic shape, and
the result is never worse than NNCF's on the verification images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import openvino as ov  # noqa: E402

from evoquant.families import ViT, mobilenet_v3_small, resnet18  # noqa: E402
from evoquant.ir.runtime import read_ir  # noqa: E402
from test_cli import run_cli  # noqa: E402

SIZE = 16

# The zoo's architectures (evoquant.families) at tiny width and depth: the same op types, built in seconds.
FAMILIES = {
    "resnet": lambda: resnet18(width=0.125, blocks=(1, 1)),
    "mobilenet_v3": lambda: mobilenet_v3_small(width=0.25, blocks=2, head=32),
    "vit": lambda: ViT(image_size=SIZE, dim=32, depth=2, heads=2),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's FP32 IR as users save it."""
    folder = tmp_path_factory.mktemp("families")
    paths = {}
    for name, factory in FAMILIES.items():
        torch.manual_seed(0)
        model = factory().eval()
        ov_model = ov.convert_model(model, example_input=torch.rand(1, 3, SIZE, SIZE))
        ov.save_model(ov_model, folder / f"{name}.xml")  # the defaults: FP16-compressed weights
        paths[name] = folder / f"{name}.xml"
    return paths


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_quantizes_and_refines_as_saved(saved, tmp_path, family, bits):
    fp32 = saved[family]
    assert read_ir(fp32).inputs[0].get_partial_shape().is_dynamic
    extra = ["--model-type", "transformer"] if family == "vit" else []
    int8 = tmp_path / "int8.xml"
    code, _, stderr = run_cli("quantize", str(fp32), "-c", "fractal", "--subset-size", "64", "--input-shape", f"1,3,{SIZE},{SIZE}", "--weight-bits", str(bits), *extra, "-o", str(int8))
    assert code == 0, stderr
    code, out, _ = run_cli("inspect", str(int8), "--json")
    listing = json.loads(out)
    assert listing["weights"], f"no quantized weights found in the {family} W{bits} model"
    code, stdout, stderr = run_cli("refine", str(int8), "-r", str(fp32), "--input-shape", f"1,3,{SIZE},{SIZE}", "--stages", "reconstruct", "--selection-size", "128",
                                   "--verification-size", "128", "--selection-pool", "256", "-q", "-o", str(tmp_path / "refined.xml"), "--report", str(tmp_path / "r.json"))
    assert code == 0, stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification_after"]["fitness"] <= report["verification_before"]["fitness"]
    for layer in report["unmatched_layers"]:  # never silently: each one is in the report and was warned about
        assert layer["name"] in stderr or f"{len(report['unmatched_layers'])} weighted layer(s) are not refined" in stderr
    refined = read_ir(tmp_path / "refined.xml")
    assert refined.inputs[0].get_partial_shape().is_dynamic  # the user's graph, only weights changed
    reconstruct = report["stages"][0]["details"]
    assert reconstruct["layers"], "the reconstruct stage saw no layer"
    assert np.isfinite(report["verification_after"]["fitness"])


def test_every_suffix_cut_of_a_vit_reads_per_image_tensors_only(saved, tmp_path):
    """The attention's reshape reads the batch size from ShapeOf of an activation: a scalar that depends on
    the input but is not a per-image tensor. A cut below it must not take it as an input (the suffix engine
    caches its inputs image by image); it recomputes it from the activation instead."""
    from evoquant import quantize
    from evoquant.ir.cut import activation_id, plan_cut
    from evoquant.ir.runtime import with_sample_shape
    from evoquant.ir.weights import find_quantized_weights

    int8 = tmp_path / "vit_int8.xml"
    quantize(saved["vit"], calibration="fractal", subset_size=32, output=int8, input_shape=(1, 3, SIZE, SIZE), model_type="transformer")
    model = with_sample_shape(read_ir(int8), (3, SIZE, SIZE))
    outputs = {activation_id(output): output for op in model.get_ordered_ops() for output in op.outputs()}
    scalar_inputs = 0
    for weight in find_quantized_weights(model):
        cut = plan_cut(model, weight)
        for key in cut.frontier:
            shape = outputs[key].get_partial_shape()
            assert shape.rank.get_length() >= 1 and shape[0].is_dynamic, f"{weight.consumer}: frontier {key} is {shape}"
        scalar_inputs += any(outputs[key].get_partial_shape().rank.get_length() == 0 for key in cut.frontier)
    assert scalar_inputs == 0
