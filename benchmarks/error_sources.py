"""Where the held-out KL left after refine comes from: weights or activations, and which layers.

    python benchmarks/error_sources.py --models dw_separable_cnn --bits 4 --source gan
    python benchmarks/error_sources.py --models all --bits 4 >> benchmarks/results/error_sources.jsonl
    python benchmarks/error_sources.py --models dw_separable_cnn --keep-fp32 type:GroupConvolution

For each zoo model: NNCF's start (300 images of the source, as in benchmarks/quality.py) and the default
refine of it on the same source. For both models, held-out KL(FP32 || model) on 1,000 real digits
(AIMET's QuantAnalyzer asks the same questions):

- ``kl``: the model as written;
- ``kl_fp32_weights``: every quantized weight replaced by the FP32 model's, and the bias after it too (NNCF's
  bias correction moved it to cancel the rounding's mean error): the activation quantizers, with the ranges
  the model has, are all that is left quantized (``weights_replaced`` of ``weights``: a weight NNCF's
  SmoothQuant rescaled, as in the ViT, is not the FP32 one and stays);
- ``kl_no_activation_quantizers``: every activation FakeQuantize removed (only the weights quantized);
- ``layers`` (refined model only): per quantized weight, the KL with that one weight (and its bias) back in FP32 and the
  rest as refined. A value above ``kl`` means the later layers' fits compensate this layer's error.

``--keep-fp32 SCOPE`` adds one more NNCF start with SCOPE left in floating point (``evoquant quantize
--ignored-scope`` syntax: names, ``re:``, ``type:``) and its refine: what mixed precision would buy.
One JSON line per (model, bits, source[, scope]).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def kl(outputs: np.ndarray, teacher: np.ndarray) -> float:
    from evoquant.fitness.objectives import kl_to_teacher

    return float(kl_to_teacher([outputs], [teacher]))


def fp32_weights(model, reference, only: int | None = None):
    """``model`` with its quantized weights (or only weight ``only``) replaced by ``reference``'s FP32 ones."""
    import openvino.opset13 as opset

    from evoquant.ir.weights import find_quantized_weights, reference_weight

    table = find_quantized_weights(model)
    reference_ops = {op.get_friendly_name(): op for op in reference.get_ordered_ops()}
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    replaced = 0
    for index, weight in enumerate(table):
        if only is not None and index != only:
            continue
        value = reference_weight(weight, reference_ops)
        if value is None or np.mean(np.abs(value - weight.values(weight.states)) <= 1.5 * np.abs(weight.scale)) < 0.9:
            continue  # no FP32 weight, or not the one these states stand for (SmoothQuant rescaled it)
        consumer = ops[weight.consumer]
        # Where the reference's weight went through a reshape, the consumer's port takes the reshaped value.
        port_shape = consumer.input_value(weight.consumer_port).get_partial_shape()
        data = value.reshape(port_shape.to_shape()) if port_shape.is_static else value
        consumer.input(weight.consumer_port).replace_source_output(opset.constant(data.astype(np.float32)).output(0))
        replaced += 1
        # NNCF's bias correction moved the bias after the layer to cancel its rounding's mean error: the
        # FP32 weight goes with the FP32 bias.
        for target in consumer.output(0).get_target_inputs():
            _reference_bias(target.get_node(), reference_ops)
    model.validate_nodes_and_infer_types()
    return model, replaced


def _reference_bias(add, reference_ops) -> None:
    """Give ``add`` (a bias Add, matched by name) the reference's constant operand, where shapes agree."""
    import openvino.opset13 as opset

    reference = reference_ops.get(add.get_friendly_name())
    if add.get_type_name() != "Add" or reference is None or reference.get_type_name() != "Add":
        return
    for port in range(2):
        mine, theirs = add.input_value(port).get_node(), reference.input_value(port).get_node()
        while mine.get_type_name() == "Convert":  # FP16-compressed IRs (ov.save_model's default)
            mine = mine.input_value(0).get_node()
        while theirs.get_type_name() == "Convert":
            theirs = theirs.input_value(0).get_node()
        if mine.get_type_name() == "Constant" and theirs.get_type_name() == "Constant" and tuple(mine.get_output_shape(0)) == tuple(theirs.get_output_shape(0)):
            add.input(port).replace_source_output(opset.constant(np.asarray(theirs.get_data(), dtype=np.float32)).output(0))


def without_activation_quantizers(model):
    """``model`` with every FakeQuantize on an activation (a non-constant input) bypassed."""
    removed = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() != "Constant":
            source = op.input_value(0)
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(source)
            removed += 1
    model.validate_nodes_and_infer_types()
    return model, removed


def analyse(xml: Path, reference_xml: Path, images: np.ndarray, teacher: np.ndarray, *, layers: bool) -> dict:
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.weights import find_quantized_weights

    run = lambda model: infer(compile_ir(model), images)[0]  # noqa: E731
    reference = read_ir(reference_xml)
    row = {"kl": kl(run(read_ir(xml)), teacher)}
    model, replaced = fp32_weights(read_ir(xml), reference)
    row["kl_fp32_weights"], row["weights_replaced"] = kl(run(model), teacher), replaced
    model, removed = without_activation_quantizers(read_ir(xml))
    row["kl_no_activation_quantizers"], row["activation_quantizers"] = kl(run(model), teacher), removed
    row["weights"] = len(find_quantized_weights(read_ir(xml)))
    if layers:
        row["layers"] = []
        for index, weight in enumerate(find_quantized_weights(read_ir(xml))):
            model, replaced = fp32_weights(read_ir(xml), reference, only=index)
            row["layers"].append({"layer": weight.consumer, "type": weight.consumer_type, "shape": list(weight.shape), "bits": 4 if weight.element_type in ("i4", "u4") else 8,
                                  "kl_this_fp32": kl(run(model), teacher) if replaced else None})
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="classic", help="zoo models or groups: classic, families, all (default: %(default)s)")
    parser.add_argument("--bits", default="4", help="weight bits, comma-separated (default: %(default)s)")
    parser.add_argument("--source", default="gan", help="gan or fractal (default: %(default)s)")
    parser.add_argument("--gan-seed", type=int, default=0)
    parser.add_argument("--keep-fp32", default=None, metavar="SCOPE", help="also quantize with SCOPE left in floating point and refine that")
    args = parser.parse_args()

    import nncf
    import openvino

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import cpu_name, zoo_instance
    from stages import zoo_models, zoo_refine

    from evoquant import quantize, zoo
    from evoquant.demo import CALIBRATION_SIZE, calibration_images
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    work = Path(tempfile.mkdtemp(prefix="evoquant-errors-"))
    for name, bits, built, model, spec, heldout in zoo_models(args.source, args.models, args.bits, "evoquant-errors-", gan_seed=args.gan_seed):
        if zoo.REGISTRY[name].task != "classification":
            continue
        images = heldout[0]
        teacher = infer(compile_ir(read_ir(built.fp32_xml), f32=True), images)[0]
        starts = [(None, Path(model))]
        if args.keep_fp32:
            start = work / f"{name}_w{bits}_mixed.xml"
            quantize(built.fp32_xml, calibration=calibration_images(spec, shape=images.shape[1:])[:CALIBRATION_SIZE], output=start, weight_bits=bits,
                     model_type=zoo.REGISTRY[name].model_type, weight_storage="keep", ignored_scope=args.keep_fp32)
            starts.append((args.keep_fp32, start))
        for scope, start in starts:
            refined = work / f"{name}_w{bits}_{'mixed' if scope else 'all'}_refined.xml"
            started = time.perf_counter()
            zoo_refine(start, built, spec, heldout, output=refined)
            seconds = time.perf_counter() - started
            row = {"benchmark": "error_sources", "model": name, "weight_bits": bits, "source": args.source, "gan_seed": args.gan_seed if args.source == "gan" else None,
                   "fp32_scope": scope, "refine_seconds": round(seconds, 1),
                   "nncf": analyse(start, built.fp32_xml, images, teacher, layers=False),
                   "refined": analyse(refined, built.fp32_xml, images, teacher, layers=scope is None),
                   "openvino": openvino.__version__.split("-")[0], "nncf_version": nncf.__version__, **zoo_instance(built.fp32_xml)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
