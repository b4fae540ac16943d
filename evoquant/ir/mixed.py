"""Mixed 4/8-bit weights: a W4A8 model whose chosen layers take their weights from a W8A8 model of the same graph.

NNCF quantizes every weight of a model to one precision (``nncf.quantize``; its ``compress_weights`` mixes
4 and 8 bits, but only for MatMul weights without activation quantizers). Two NNCF runs on the same
calibration images, target device and model type give two models of the same graph: the same activation
quantizers and ranges (they are calibrated before the weights are rounded), the same SmoothQuant scales, and
weights rounded to 4 and to 8 bits with the bias after each layer corrected for that rounding. Taking a
layer's 8-bit states, scale and corrected bias into the 4-bit model is then exactly what NNCF would have
written had it quantized that one layer to 8 bits. The result is an ordinary IR (``Constant(i8) → Convert →
Multiply`` beside ``Constant(i4) → Convert → Multiply``) that the CPU plugin runs.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.errors import EvoquantError
from evoquant.ir.layers import copy_bias
from evoquant.ir.weights import QuantizedWeight, WeightTable, consumers, find_quantized_weights


def parse_scope(entries: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Split scope entries (``NAME``, ``re:PATTERN``, ``type:OpType``, as NNCF's ``IgnoredScope`` takes them)
    into names, patterns and types; a pattern that does not compile is a one-line error."""
    names, patterns, types = [], [], []
    for entry in entries:
        kind, sep, value = entry.partition(":")
        if sep and kind == "re":
            try:
                re.compile(value)
            except re.error as error:
                raise EvoquantError(f"scope pattern {value!r} is not a valid regular expression: {error}") from None
            patterns.append(value)
        elif sep and kind == "type":
            types.append(value)
        else:
            names.append(entry)
    return names, patterns, types


def layers_in_scope(weights: Iterable[QuantizedWeight], entries: Sequence[str], option: str) -> list[str]:
    """The layers (weight consumers) that ``entries`` name, in the weights' order; an entry that names no
    quantized weight's layer is an error (as NNCF's ignored scope is), naming ``option``."""
    weights = list(weights)
    names, patterns, types = parse_scope(entries)
    chosen: set[str] = set()
    for name in names:
        if not any(weight.consumer == name for weight in weights):
            raise EvoquantError(f"{option}: no quantized layer is named {name!r} (evoquant inspect lists them)")
        chosen.add(name)
    for pattern in patterns:
        matched = {weight.consumer for weight in weights if re.match(pattern, weight.consumer)}
        if not matched:
            raise EvoquantError(f"{option}: re:{pattern} matches no quantized layer (evoquant inspect lists them)")
        chosen |= matched
    for kind in types:
        matched = {weight.consumer for weight in weights if weight.consumer_type == kind}
        if not matched:
            raise EvoquantError(f"{option}: no quantized layer is of type {kind} (evoquant inspect lists the types)")
        chosen |= matched
    return [weight.consumer for weight in weights if weight.consumer in chosen]


def _check_same_graph(mine: WeightTable, theirs: WeightTable) -> None:
    """Two weight tables hold the same quantized weights (layer, port, shape), compressed: what :func:`take_weights` needs."""
    key = lambda weight: (weight.consumer, weight.consumer_port, weight.shape)  # noqa: E731
    if [key(w) for w in mine] != [key(w) for w in theirs]:
        raise EvoquantError("NNCF's 4-bit and 8-bit runs quantized different weights: the layers cannot be mixed")
    if any(weight.form != "compressed" for weight in list(mine) + list(theirs)):
        raise EvoquantError("mixed precision needs NNCF's compressed weights (Constant -> Convert -> Multiply)")


def take_weights(model: ov.Model, donor: ov.Model, layers: Iterable[str]) -> int:
    """Give ``model`` (edited in place) ``donor``'s quantized weights of ``layers`` -- integer states, zero point
    and scale -- and the bias after each of them. Returns how many weights were taken."""
    mine, theirs = find_quantized_weights(model), find_quantized_weights(donor)
    _check_same_graph(mine, theirs)
    wanted = set(layers)
    ops = model.get_ordered_ops()
    by_name = {op.get_friendly_name(): op for op in ops}
    donor_ops = {op.get_friendly_name(): op for op in donor.get_ordered_ops()}
    taken = 0
    for weight, source in zip(mine, theirs):
        if weight.consumer not in wanted:
            continue
        constant = ops[weight.constant_position]
        new = opset.constant(source.constant_data(source.states))
        new.set_friendly_name(constant.get_friendly_name())
        for target in list(constant.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        _replace_dequantization(new, source)
        for target in by_name[weight.consumer].output(0).get_target_inputs():
            copy_bias(target.get_node(), donor_ops)
        taken += 1
    model.validate_nodes_and_infer_types()
    return taken


def _replace_dequantization(constant: ov.Node, source: QuantizedWeight) -> None:
    """Set the zero point (if any) and the scale on ``constant``'s ``Convert → [Subtract] → Multiply`` chain to ``source``'s."""
    previous = consumers(constant.output(0))[0].get_node()  # the Convert
    node = consumers(previous.output(0))[0].get_node()
    if node.get_type_name() == "Subtract":
        node.input(1).replace_source_output(opset.constant(np.asarray(source.offset, dtype=np.float32)).output(0))
        previous, node = node, consumers(node.output(0))[0].get_node()
    port = 0 if node.input_value(0).get_node().get_friendly_name() == previous.get_friendly_name() else 1
    node.input(1 - port).replace_source_output(opset.constant(np.asarray(source.scale, dtype=np.float32)).output(0))
