"""Can a quantized layer be emulated outside OpenVINO, exactly? One JSON line per quantized layer.

    python benchmarks/emulation_check.py                       # bn_cnn and deep_residual_cnn
    python benchmarks/emulation_check.py --models dw_separable_cnn

For the fitness engine (issue: at least 20x faster than recompiling, and exact): a candidate changes one
layer's weights. If that layer, and the elementwise ops after it up to the next quantized activation, can be
computed in numpy from cached inputs so that the quantized result equals the CPU plugin's INT8 execution,
the engine needs no compile for the changed layer: only an INT8 suffix compiled once per parent.

For each layer this follows the chain layer → [Add bias] → [FakeQuantize] → [Add other branch] → [Relu] →
FakeQuantize up to an activation quantizer whose output feeds no Add (exporting those leaves the plugin's
fusion unchanged on chains; on residual blocks it does not, so the largest logit change the exports cause
is printed too). It exports the layer's input and the other Add inputs, recomputes the chain in float64
from the IR's own constants, and prints the share of quantized elements that differ from the plugin's
(more than half a quantization step; for the float logits, more than 1/1000 of their spread).

A last line per model compares the plugin's logits with the whole IR interpreted in float64 (reference
semantics of every op), without and with the activation exports, and with the quantizers the plugin fuses
into residual joins applied as a clamp only (see ``evoquant.ir.cut.fused_residual_quantizers``).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def _const(node) -> np.ndarray:
    return np.array(node.data, dtype=np.float64)


def _is_const(output) -> bool:
    return output.get_node().get_type_name() == "Constant"


def _single_consumer(node):
    targets = list(node.output(0).get_target_inputs())
    return targets[0].get_node() if len(targets) == 1 else None


def _quantize(x: np.ndarray, low, high, out_low, out_high, levels: int) -> np.ndarray:
    """FakeQuantize's reference arithmetic."""
    q = np.round((np.clip(x, low, high) - low) / (high - low) * (levels - 1))
    return q / (levels - 1) * (out_high - out_low) + out_low


def _fake_quantize(x: np.ndarray, fq) -> tuple[np.ndarray, np.ndarray]:
    """``fq`` applied to ``x`` from its own constants, and its step."""
    low, high, out_low, out_high = (_const(fq.input_value(i).get_node()) for i in range(1, 5))
    levels = fq.get_attributes()["levels"]
    return _quantize(x, low, high, out_low, out_high, levels), (out_high - out_low) / (levels - 1)


def _layer(x: np.ndarray, node, weight: np.ndarray) -> np.ndarray:
    """A Convolution, GroupConvolution or MatMul node applied to ``x`` with ``weight`` (any shape holding
    the node's weight values: it is reshaped to the node's own weight input)."""
    import torch

    attributes = node.get_attributes()
    if node.get_type_name() == "MatMul":
        a = x.swapaxes(-1, -2) if attributes["transpose_a"] else x
        b = weight.swapaxes(-1, -2) if attributes["transpose_b"] else weight
        return a @ b
    groups = 1
    if node.get_type_name() == "GroupConvolution":
        shape = [int(d) for d in node.input_value(1).get_shape()]  # (groups, out/groups, in/groups, kh, kw)
        groups = shape[0]
        weight = weight.reshape(shape[0] * shape[1], *shape[2:])
    pads = attributes["pads_begin"]
    if attributes["pads_end"] != pads:
        raise NotImplementedError("asymmetric padding")
    return torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight), stride=attributes["strides"], padding=pads, dilation=attributes["dilations"], groups=groups).numpy()


def reference_forward(model_xml: str, images: np.ndarray, *, clamp_fused: bool = False) -> np.ndarray:
    """The whole IR interpreted in float64 with the reference semantics of each op (the zoo's op set);
    with ``clamp_fused``, :func:`evoquant.ir.cut.fused_residual_quantizers` only clamp."""
    import torch

    from evoquant.ir.cut import fused_residual_quantizers
    from evoquant.ir.runtime import read_ir

    model = read_ir(model_xml)
    clamped = fused_residual_quantizers(model) if clamp_fused else set()
    values: dict[tuple[str, int], np.ndarray | None] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        inputs = [values.get((v.get_node().get_friendly_name(), v.get_index())) for v in op.input_values()]
        attributes = op.get_attributes()
        if kind == "Parameter":
            out = images.astype(np.float64)
        elif kind == "Constant":
            out = _const(op)
        elif kind == "Convert" or kind == "Result":
            out = inputs[0]
        elif kind in ("Multiply", "Subtract", "Add"):
            out = {"Multiply": np.multiply, "Subtract": np.subtract, "Add": np.add}[kind](inputs[0], inputs[1])
        elif kind == "Relu":
            out = np.maximum(inputs[0], 0.0)
        elif kind == "FakeQuantize" and op.get_friendly_name() in clamped:
            out = np.clip(inputs[0], inputs[1], inputs[2])
        elif kind == "FakeQuantize":
            out = _quantize(inputs[0], *inputs[1:5], attributes["levels"])
        elif kind in ("Convolution", "GroupConvolution", "MatMul"):
            out = _layer(inputs[0], op, inputs[1])
        elif kind == "ReduceMean":
            out = inputs[0].mean(axis=tuple(int(i) for i in inputs[1].reshape(-1)), keepdims=attributes["keep_dims"])
        elif kind == "MaxPool":
            out = torch.nn.functional.max_pool2d(torch.from_numpy(inputs[0]), attributes["kernel"], attributes["strides"], attributes["pads_begin"]).numpy()
        elif kind == "Reshape":
            out = inputs[0].reshape(len(inputs[0]), -1)  # the zoo's only reshape: flatten
        elif kind in ("ShapeOf", "Gather", "Concat"):
            out = None  # shape arithmetic for the flatten
        else:
            raise NotImplementedError(kind)
        values[(op.get_friendly_name(), 0)] = out
        if kind == "Result":
            return out
    raise ValueError("no Result")


def whole_model(model_xml: str, images: np.ndarray) -> dict:
    """How far the plugin's INT8 logits are from the float64 reference, without and with activation exports."""
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    reference = reference_forward(model_xml, images)
    plain = infer(compile_ir(read_ir(model_xml)), images)[0]
    model = read_ir(model_xml)
    model.add_outputs([op.output(0) for op in model.get_ordered_ops() if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() == "Relu"])
    exported = infer(compile_ir(model), images)[0]
    clamped = reference_forward(model_xml, images, clamp_fused=True)
    return {"benchmark": "emulation_check", "model": model_xml.split("/")[-2], "whole_model": True,
            "max_logit_gap_plain_vs_reference": float(np.abs(plain - reference).max()),
            "max_logit_gap_plain_vs_clamped_reference": float(np.abs(plain - clamped).max()),
            "max_logit_gap_exported_vs_reference": float(np.abs(exported - reference).max()),
            "max_abs_logit": float(np.abs(reference).max())}


def chain(layer):
    """The ops from the layer to the first quantized activation that feeds no Add, or None if unsupported."""
    ops, node = [], layer
    while True:
        node = _single_consumer(node)
        if node is None:
            return None, "the layer's output branches before a quantized activation"
        if node.get_type_name() == "Result":
            return ops, None  # the model's output itself (float logits, no quantizer)
        kind = node.get_type_name()
        if kind not in ("Add", "Relu", "FakeQuantize"):
            return None, f"{kind} after the layer"
        ops.append(node)
        if kind == "FakeQuantize":
            follow = [t.get_node().get_type_name() for t in node.output(0).get_target_inputs()]
            if "Add" not in follow or (len(ops) > 1 and ops[-2].get_type_name() == "Relu"):
                return ops, None


def check(model_xml: str, images: np.ndarray) -> list[dict]:
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.weights import find_quantized_weights

    base = infer(compile_ir(read_ir(model_xml)), images)[0]
    rows = []
    for index, weight in enumerate(find_quantized_weights(read_ir(model_xml))):
        model = read_ir(model_xml)
        by_name = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        layer = by_name[weight.consumer]
        ops, reason = chain(layer)
        row = {"benchmark": "emulation_check", "model": model_xml.split("/")[-2], "tensor": index, "layer": weight.consumer, "type": layer.get_type_name()}
        if ops is None:
            rows.append({**row, "emulated": False, "reason": reason})
            continue
        inside = {layer.get_friendly_name()} | {op.get_friendly_name() for op in ops}
        exports = [layer.input_value(0)] + [v for op in ops if op.get_type_name() == "Add" for v in op.input_values() if not _is_const(v) and v.get_node().get_friendly_name() not in inside]
        at_result = ops[-1].get_type_name() != "FakeQuantize"  # the chain ends at the model's own output
        model.add_outputs(exports + ([] if at_result else [ops[-1].output(0)]))
        outputs = infer(compile_ir(model), images)
        export_shift = float(np.abs(outputs[0] - base).max())
        values = dict(zip(range(len(exports)), outputs[1 : 1 + len(exports)]))
        x = _layer(values[0].astype(np.float64), layer, weight.values(weight.states).astype(np.float64))
        other = 1
        for op in ops:
            kind = op.get_type_name()
            if kind == "Add":
                second = op.input_value(1) if op.input_value(0).get_node().get_friendly_name() in inside else op.input_value(0)
                if _is_const(second):
                    bias = _const(second.get_node())
                    x = x + (bias.reshape(1, -1) if x.ndim == 2 else bias)
                else:
                    x = x + values[other].astype(np.float64)
                    other += 1
            elif kind == "Relu":
                x = np.maximum(x, 0.0)
            else:
                x, step = _fake_quantize(x, op)
        plugin = (outputs[0] if at_result else outputs[-1]).astype(np.float64)
        if at_result:  # float output: measure in units of its own spread
            step = float(np.std(plugin)) * 1e-3
        steps = np.abs(x - plugin) / step
        rows.append({**row, "emulated": True, "ops": [op.get_type_name() for op in ops], "max_logit_change_from_exports": export_shift,
                     "mismatch_share": float(np.mean(steps > 0.5)), "max_steps_off": float(steps.max())})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,deep_residual_cnn")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()

    from eval_speed import register_deep_residual

    from evoquant import zoo
    from evoquant.data import load_source
    from evoquant.demo import calibration_images

    register_deep_residual()
    images = load_source("fractal").sample(args.batch, zoo.INPUT_SHAPE, seed=1234).images
    for name in args.models.split(","):
        built = zoo.build(name.strip(), calibration=calibration_images())
        for row in check(str(built.int8_xml), images):
            print(json.dumps(row), flush=True)
        print(json.dumps(whole_model(str(built.int8_xml), images)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
