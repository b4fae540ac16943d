"""Take quantization out of an IR piece by piece, to see where its error comes from (:mod:`evoquant.analyze`).

Two edits of a quantized model, each on a copy the caller owns:

* :func:`with_fp32_weights` puts the FP32 reference's weight back in place of every quantized weight (or
  one of them), together with the bias after it: NNCF's bias correction moved that bias to cancel the
  rounding's mean error, so the FP32 weight goes with the FP32 bias. A weight whose FP32 value is not
  what its integer states stand for (SmoothQuant rescaled it and its activation) stays as it is.
* :func:`without_activation_quantizers` bypasses every FakeQuantize on an activation (or one of them).

Both leave the graph otherwise as it was; neither is ever saved over the user's files.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.ir.layers import copy_bias
from evoquant.ir.ranges import data_quantizers
from evoquant.ir.weights import find_quantized_weights, reference_weight


def with_fp32_weights(model: ov.Model, reference: ov.Model, only: int | None = None) -> tuple[ov.Model, int]:
    """``model`` (edited in place) with its quantized weights, or only weight number ``only`` of
    :func:`~evoquant.ir.weights.find_quantized_weights`, and the biases after them replaced by
    ``reference``'s; returns the model and how many weights were replaced."""
    table = find_quantized_weights(model)
    reference_ops = {op.get_friendly_name(): op for op in reference.get_ordered_ops()}
    ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
    replaced = 0
    for index, weight in enumerate(table):
        if only is not None and index != only:
            continue
        value = fp32_weight(weight, reference_ops)
        if value is None:
            continue
        consumer = ops[weight.consumer]
        port_shape = consumer.input_value(weight.consumer_port).get_partial_shape()
        data = value.reshape(port_shape.to_shape()) if port_shape.is_static else value  # the layer takes the weight reshaped
        consumer.input(weight.consumer_port).replace_source_output(opset.constant(data.astype(np.float32)).output(0))
        replaced += 1
        for target in consumer.output(0).get_target_inputs():
            copy_bias(target.get_node(), reference_ops)
    model.validate_nodes_and_infer_types()
    return model, replaced


def fp32_weight(weight, reference_ops: dict[str, ov.Node]) -> np.ndarray | None:
    """The reference's FP32 weight for ``weight`` where it is the one the states were rounded from (at least
    90 % of its values within 1.5 steps of what the states stand for; SmoothQuant's are not), else None."""
    value = reference_weight(weight, reference_ops)
    if value is None or np.mean(np.abs(value - weight.values(weight.states)) <= 1.5 * np.abs(weight.scale)) < 0.9:
        return None
    return value


def activation_quantizer_names(model: ov.Model) -> list[str]:
    """The friendly names of the FakeQuantize ops on activations and on the model input (not on weights, also
    not an FP16 weight's through its Convert), in graph order."""
    return [node.get_friendly_name() for node in data_quantizers(model)]


def without_activation_quantizers(model: ov.Model, only: str | None = None) -> tuple[ov.Model, int]:
    """``model`` (edited in place) with every FakeQuantize on an activation or the model input (or only the one
    named ``only``) bypassed; returns it and how many."""
    removed = 0
    for node in data_quantizers(model):
        if only is not None and node.get_friendly_name() != only:
            continue
        source = node.input_value(0)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(source)
        removed += 1
    model.validate_nodes_and_infer_types()
    return model, removed
