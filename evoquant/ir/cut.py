"""Cut an IR at a quantized layer: the *suffix* graph that recomputes only what a change of that layer can
reach, and the *probe* graph that exposes the activations every suffix needs.

For the layer that consumes quantized tensor ``t`` (a Convolution, MatMul, ...):

* its **descendants** ``D`` are every op whose value depends on the layer's output;
* its **frontier** is every activation produced outside ``D`` and consumed inside it: the layer's own
  data input, and, in graphs with branches, skip connections that join below the layer;
* the **suffix** graph is ``D`` alone, with a Parameter for each frontier activation and one f32
  Parameter for the layer's weight (dequantized). Everything below the layer keeps its Constants, so the
  plugin still runs those layers with INT8 kernels; only the cut layer itself runs in f32 on the exact
  quantized values, which reproduces the INT8 arithmetic up to float rounding.

Works for any DAG: chains, branches, skip connections.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.ir.weights import QuantizedWeight


@dataclass(frozen=True)
class Cut:
    """How the suffix of one layer plugs into cached activations."""

    tensor: int
    nodes: frozenset[str]  # ops the suffix recomputes (the layer's descendants, grown past unsafe cuts)
    frontier: tuple[str, ...]  # activation ids ("node_name:port") fed as suffix inputs, in input order
    outputs: tuple[int, ...]  # indices of the model's outputs that the suffix recomputes
    weight_shape: tuple[int, ...]  # shape of the weight port the f32 Parameter replaces


def activation_id(output: ov.Output) -> str:
    return f"{output.get_node().get_friendly_name()}:{output.get_index()}"


def _depends_on_input(model: ov.Model) -> set[str]:
    """Names of ops whose value depends on a model Parameter (the rest are constant subgraphs)."""
    dynamic: set[str] = set()
    for op in model.get_ordered_ops():  # topological order
        if op.get_type_name() == "Parameter" or any(op.input_value(i).get_node().get_friendly_name() in dynamic for i in range(op.get_input_size())):
            dynamic.add(op.get_friendly_name())
    return dynamic


def _descendants(layer: ov.Node) -> set[str]:
    seen: set[str] = set()
    stack = [layer]
    while stack:
        node = stack.pop()
        name = node.get_friendly_name()
        if name in seen:
            continue
        seen.add(name)
        for output in node.outputs():
            stack.extend(target.get_node() for target in output.get_target_inputs())
    return seen


def _per_image(output: ov.Output, batch: ov.Dimension) -> bool:
    """Whether a tensor is a batch of per-image values: its first dimension is the model's batch ``batch``
    (dynamic, or the same fixed size)."""
    shape = output.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() < 1:
        return False
    first = shape[0]
    return first.is_dynamic if batch.is_dynamic else first.is_static and first.get_length() == batch.get_length()


def plan_cut(model: ov.Model, weight: QuantizedWeight, is_safe: Callable[[str], bool] | None = None) -> Cut:
    """The frontier and recomputed outputs of the cut at ``weight``'s layer (no graph is built).

    ``is_safe(activation_id)`` says whether reading that activation out of the model leaves the model's
    results unchanged. Exporting some tensors (e.g. the quantized inputs of a residual Add, which the CPU
    plugin fuses into an INT8 eltwise) changes how the graph executes; the cut then grows upward past
    them until every frontier tensor is safe (at worst up to the model input, which always is).
    """
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    order = {name: i for i, name in enumerate(ops)}
    layer = ops[weight.consumer]
    below = _descendants(layer)
    dynamic = _depends_on_input(model)
    input_shape = model.inputs[0].get_partial_shape()
    batch = input_shape[0] if input_shape.rank.is_static else ov.Dimension()
    while True:
        frontier: dict[str, bool] = {}
        for name in sorted(below, key=order.__getitem__):
            node = ops[name]
            for port in range(node.get_input_size()):
                if node is layer and port == weight.consumer_port:
                    continue
                source = node.input_value(port)
                source_name = source.get_node().get_friendly_name()
                if source_name not in below and source_name in dynamic:
                    frontier[activation_id(source)] = _per_image(source, batch)
        # A tensor without the batch first (a shape computed from the input, e.g. the batch size an attention
        # reshape reads) cannot be cached image by image: the cut grows past it to the activation it came from.
        unsafe = [key for key, per_image in frontier.items() if ops[key.rpartition(":")[0]].get_type_name() != "Parameter"
                  and (not per_image or (is_safe is not None and not is_safe(key)))]
        if not unsafe:
            break
        below |= {key.rpartition(":")[0] for key in unsafe}
    outputs = tuple(i for i, result in enumerate(model.outputs) if result.get_node().get_friendly_name() in below)
    weight_shape = tuple(layer.input_value(weight.consumer_port).get_partial_shape().to_shape())
    return Cut(weight.index, frozenset(below), tuple(frontier), outputs, weight_shape)


def build_suffix(model: ov.Model, weight: QuantizedWeight, cut: Cut, shared: Sequence[QuantizedWeight] = ()) -> ov.Model:
    """The suffix graph of ``cut`` built from a clone of ``model`` (whose constants it keeps).

    Inputs: one Parameter per frontier activation (in ``cut.frontier`` order), then the f32 weight, then
    one f32 Parameter per weight in ``shared`` (quantized weights below the cut). With every weight below
    the cut an input, the graph no longer depends on the parent: one compile serves every parent, at the
    price of f32 kernels below the cut too. Outputs: the model outputs listed in ``cut.outputs``.
    """
    clone = model.clone()
    ops = {op.get_friendly_name(): op for op in clone.get_ordered_ops()}
    layer = ops[weight.consumer]
    clamped = _cut_layer_quantizer(layer, fused_residual_quantizers(clone))
    below = cut.nodes
    parameters: dict[str, ov.Node] = {}
    feeds: dict[str, ov.Output] = {}
    for name in below:
        node = ops[name]
        for port in range(node.get_input_size()):
            source = node.input_value(port)
            key = activation_id(source)
            if key not in cut.frontier:
                continue
            if source.get_node().get_friendly_name() in below:
                continue
            if key not in parameters:
                parameters[key] = opset.parameter(source.get_partial_shape(), source.get_element_type(), name=f"frontier:{key}")
                feeds[key] = _requantized(parameters[key].output(0), source.get_node())
            node.input(port).replace_source_output(feeds[key])
    weight_parameter = opset.parameter(list(cut.weight_shape), np.float32, name="cut_weight")
    layer.input(weight.consumer_port).replace_source_output(weight_parameter.output(0))
    if clamped is not None:
        _replace_by_clamp(clamped)
    results = [clone.get_results()[i] for i in cut.outputs]
    weights = _weights_as_inputs(ops, shared)
    return ov.Model(results, [parameters[key] for key in cut.frontier] + [weight_parameter] + weights, f"suffix_{weight.index}")


def _requantized(value: ov.Output, source: ov.Node) -> ov.Output:
    """A frontier activation that was a FakeQuantize's output goes through a copy of that quantizer again.

    Its values are already on the grid, so the copy changes no number; but the plugin then sees the same
    quantized pattern as in the whole model (e.g. an INT8 residual Add) and fuses the suffix alike. Measured
    on deep_residual_cnn: 10 of 20 layers get bit-exact suffixes with it, 5 without.
    """
    if source.get_type_name() != "FakeQuantize":
        return value
    return opset.fake_quantize(value, *(source.input_value(i) for i in range(1, 5)), source.get_attributes()["levels"]).output(0)


def _cut_layer_quantizer(layer: ov.Node, fused: set[str]) -> ov.Node | None:
    """The cut layer's output quantizer (layer → Add bias → FakeQuantize) if the plugin fuses it into a
    residual join, else None."""
    for add in (t.get_node() for t in layer.output(0).get_target_inputs()):
        for target in add.output(0).get_target_inputs():
            if target.get_node().get_friendly_name() in fused:
                return target.get_node()
    return None


def _replace_by_clamp(quantizer: ov.Node) -> None:
    low = float(np.array(quantizer.input_value(1).get_node().data).reshape(-1)[0])
    high = float(np.array(quantizer.input_value(2).get_node().data).reshape(-1)[0])
    clamp = opset.clamp(quantizer.input_value(0), low, high)
    for target in list(quantizer.output(0).get_target_inputs()):
        target.replace_source_output(clamp.output(0))


def _conv_output_quantizer(node: ov.Node) -> bool:
    """A FakeQuantize on a convolution's biased output (conv → Add(bias) → FakeQuantize)."""
    if node.get_type_name() != "FakeQuantize":
        return False
    source = node.input_value(0).get_node()
    return source.get_type_name() == "Add" and any(v.get_node().get_type_name() in ("Convolution", "GroupConvolution") for v in source.input_values())


def fused_residual_quantizers(model: ov.Model) -> set[str]:
    """Quantizers the CPU plugin applies as a clamp only: a conv's output quantizer that feeds a residual
    Add (when both Add inputs are such quantizers, only the one on the Add's first input), with one scalar
    range equal on input and output.

    The plugin fuses conv, Add, ReLU and the next quantizer into one INT8 kernel and that quantizer then
    clamps to its range without rounding to its grid. Measured on a two-conv residual block built in code:
    the plugin's output differs from reference arithmetic in 24 % of elements, from "clamp, don't round" in
    0.01 %; on deep_residual_cnn the logit gap to the reference drops from 0.22 to 0.018
    (``benchmarks/emulation_check.py``). So a suffix whose cut layer runs in f32 clamps there too.
    """
    names = set()
    for node in model.get_ordered_ops():
        if not _conv_output_quantizer(node):
            continue
        joins = [t for t in node.output(0).get_target_inputs() if t.get_node().get_type_name() == "Add"]
        if len(joins) != 1 or len(node.output(0).get_target_inputs()) != 1:
            continue
        ranges = [node.input_value(i).get_node() for i in range(1, 5)]
        if any(r.get_type_name() != "Constant" for r in ranges):
            continue
        low, high, out_low, out_high = (np.array(r.data, dtype=np.float64) for r in ranges)
        if low.size != 1 or high.size != 1 or not (np.array_equal(low, out_low) and np.array_equal(high, out_high)):
            continue
        other = joins[0].get_node().input_value(1 - joins[0].get_index()).get_node()
        if not _conv_output_quantizer(other) or joins[0].get_index() == 0:
            names.add(node.get_friendly_name())
    return names


def build_probe(model: ov.Model, activations: list[str], shared: Sequence[QuantizedWeight] = ()) -> ov.Model:
    """A clone of ``model`` that also outputs the named activations (after its own outputs).

    With ``shared``, those weights become f32 inputs after the model's own (one compile for every parent).
    """
    clone = model.clone()
    ops = {op.get_friendly_name(): op for op in clone.get_ordered_ops()}
    extra = []
    for key in activations:
        name, _, port = key.rpartition(":")
        extra.append(opset.result(ops[name].output(int(port))))
    weights = _weights_as_inputs(ops, shared)
    return ov.Model(list(clone.get_results()) + extra, list(clone.get_parameters()) + weights, "probe")


def _weights_as_inputs(ops: dict[str, ov.Node], weights: Sequence[QuantizedWeight]) -> list[ov.Node]:
    """Replace each weight's input port (in the clone whose ops are given) by an f32 Parameter."""
    parameters = []
    for weight in weights:
        consumer = ops[weight.consumer]
        shape = list(consumer.input_value(weight.consumer_port).get_partial_shape().to_shape())
        parameters.append(opset.parameter(shape, np.float32, name=f"weight:{weight.index}"))
        consumer.input(weight.consumer_port).replace_source_output(parameters[-1].output(0))
    return parameters
