"""What a quantized layer computes, and its activations as OpenVINO produces them.

The layer-wise reconstruction (:mod:`evoquant.reconstruct`) needs, per quantized weight: the layer's
geometry (convolution strides, pads, dilations and groups; MatMul operand order and transposes), the bias
added right after it, and its input activations (in the quantized model, as the plugin feeds them) and
output (in the FP32 reference, bias included). This module is the only place that reads them from a graph;
everything it returns is plain numpy and dataclasses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.ir.runtime import compile_ir
from evoquant.ir.weights import QuantizedWeight, constant_value, consumers

_SAME_ORDER = {"Reshape", "Squeeze", "Unsqueeze", "Convert"}  # keep the weight's element order


@dataclass(frozen=True)
class LayerGeometry:
    """How a weight is applied. ``kind`` is ``conv`` or ``matmul``.

    conv: weight as the layer sees it ``[O, C, *k]`` (``groups`` > 1: ``[G, O/G, C/G, *k]``), explicit pads.
    matmul: ``weight_port`` 1 (``x · W``) or 0 (``W · x``) and the op's transposes; the weight is 2-D.
    """

    kind: str
    name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # per sample, without the batch
    output_shape: tuple[int, ...]
    groups: int = 1
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()
    weight_port: int = 1
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def outputs_per_group(self) -> int:
        if self.kind == "conv":
            return self.weight_shape[1] if self.groups > 1 else self.weight_shape[0]
        return self.matmul_matrix_shape[0]

    @property
    def matmul_matrix_shape(self) -> tuple[int, int]:
        """``(O, K)`` of a MatMul's weight as an output-by-input matrix."""
        rows, columns = self.weight_shape
        if self.weight_port == 1:
            return (rows, columns) if self.transpose_b else (columns, rows)
        return (columns, rows) if self.transpose_a else (rows, columns)


class UnsupportedLayer(Exception):
    """The reconstruction cannot handle this layer; the message says why (reported, never silent)."""


def layer_geometry(model: ov.Model, weight: QuantizedWeight) -> LayerGeometry:
    """The geometry of ``weight``'s layer in ``model`` (static per-sample shapes needed)."""
    layer = _by_name(model, weight.consumer)
    if layer is None:
        raise UnsupportedLayer(f"no layer named {weight.consumer}")
    path = _weight_path(layer, weight.consumer_port)
    if any(kind not in _SAME_ORDER for kind in path):
        raise UnsupportedLayer(f"its weight passes through {', '.join(path)} on the way to the layer")
    data_port = 1 - weight.consumer_port if layer.get_type_name() == "MatMul" else 0
    input_shape = _sample_shape(layer.input(data_port).get_partial_shape())
    output_shape = _sample_shape(layer.get_output_partial_shape(0))
    weight_shape = tuple(layer.input(weight.consumer_port).get_shape())
    kind = layer.get_type_name()
    if kind in ("Convolution", "GroupConvolution"):
        attributes = layer.get_attributes()
        groups = weight_shape[0] if kind == "GroupConvolution" else 1
        kernel = weight_shape[3:] if kind == "GroupConvolution" else weight_shape[2:]
        strides, dilations = tuple(attributes["strides"]), tuple(attributes["dilations"])
        pads_begin, pads_end = _pads(attributes, input_shape[1:], output_shape[1:], kernel, strides, dilations)
        return LayerGeometry("conv", weight.consumer, weight_shape, input_shape, output_shape, groups, strides, dilations, pads_begin, pads_end)
    if kind == "MatMul":
        if len(weight_shape) != 2:
            raise UnsupportedLayer(f"its weight has {len(weight_shape)} dimensions (2 supported)")
        attributes = layer.get_attributes()
        return LayerGeometry("matmul", weight.consumer, weight_shape, input_shape, output_shape, weight_port=weight.consumer_port,
                             transpose_a=bool(attributes["transpose_a"]), transpose_b=bool(attributes["transpose_b"]))
    raise UnsupportedLayer(f"{kind} layers are not reconstructed")


def layer_output_shape(model: ov.Model, name: str) -> tuple[int, ...]:
    """Per-sample output shape of layer ``name`` after its bias add (the reconstruction's target)."""
    layer = _by_name(model, name)
    if layer is None:
        raise UnsupportedLayer("the reference has no layer of this name")
    add = _bias_add(model, name)
    return _sample_shape((add if add is not None else layer).get_output_partial_shape(0))


def layer_bias(model: ov.Model, name: str) -> np.ndarray | None:
    """The constant added right after layer ``name`` (its bias), shaped to broadcast on its output; None if none."""
    add = _bias_add(model, name)
    return None if add is None else _bias_value(add)


def layer_weight(model: ov.Model, name: str, port: int) -> np.ndarray | None:
    """The float weight layer ``name`` reads on ``port`` when it is a plain constant (an FP32 reference's
    weight, possibly FP16-compressed behind a Convert, or behind a shape-only Reshape); None otherwise."""
    layer = _by_name(model, name)
    if layer is None:
        return None
    node = layer.input_value(port).get_node()
    while node.get_type_name() in ("Reshape", "Squeeze", "Unsqueeze"):
        node = node.input_value(0).get_node()
    value = constant_value(node)
    if value is None:
        return None
    shape = tuple(layer.input(port).get_shape())
    return value.reshape(shape) if value.size == int(np.prod(shape)) else None


class ActivationTap:
    """Runs a model and returns chosen intermediate tensors: layer inputs (as the plugin feeds them) and
    layer outputs (after the bias add, when there is one). The model itself is not modified; only the part
    of the graph the taps depend on is compiled and run (a tap near the input costs a fraction of a forward)."""

    def __init__(self, model: ov.Model, taps: Sequence[tuple[str, str, int]], *, f32: bool, threads: int | None = None):
        """``taps``: ``("input", layer, port)`` or ``("output", layer, 0)``."""
        copy = model.clone()
        outputs, positions, order = [], {}, []
        for tap in taps:  # a tensor tapped twice (e.g. the input of Q, K and V) is one output
            output = _tap_output(copy, *tap)
            key = (output.get_node().get_friendly_name(), output.get_index())
            if key not in positions:
                positions[key] = len(outputs)
                outputs.append(output)
            order.append(positions[key])
        pruned = ov.Model([opset.result(output) for output in outputs], copy.get_parameters(), "taps")
        self.compiled = compile_ir(pruned, threads=threads, f32=f32)
        self.targets = [self.compiled.outputs[position] for position in order]

    def run(self, images: np.ndarray) -> list[np.ndarray]:
        request = self.compiled.create_infer_request()
        result = request.infer({0: images})
        return [np.array(result[output], dtype=np.float32) for output in self.targets]

    def chunks(self, images: np.ndarray, batch_size: int) -> Iterator[tuple[int, list[np.ndarray]]]:
        for start in range(0, len(images), batch_size):
            yield start, self.run(images[start : start + batch_size])


def _tap_output(model: ov.Model, kind: str, name: str, port: int) -> ov.Output:
    layer = _by_name(model, name)
    if layer is None:
        raise UnsupportedLayer(f"no layer named {name}")
    if kind == "input":
        return layer.input_value(port)
    add = _bias_add(model, name)
    return (add if add is not None else layer).output(0)


def _by_name(model: ov.Model, name: str) -> ov.Node | None:
    for op in model.get_ordered_ops():
        if op.get_friendly_name() == name:
            return op
    return None


def _bias_add(model: ov.Model, name: str) -> ov.Node | None:
    layer = _by_name(model, name)
    if layer is None:
        return None
    targets = consumers(layer.output(0))
    if len(targets) != 1 or targets[0].get_node().get_type_name() != "Add":
        return None
    add = targets[0].get_node()
    return add if _bias_value(add) is not None else None


def copy_bias(add: ov.Node, source_ops: dict[str, ov.Node]) -> bool:
    """Give ``add`` (a bias Add) the constant operand of the Add of the same name in another model of the same
    graph (``source_ops``: its ops by friendly name), where the shapes agree; FP16-compressed constants
    (``ov.save_model``'s default) are read through their Convert. Returns whether it did."""
    source = source_ops.get(add.get_friendly_name())
    if add.get_type_name() != "Add" or source is None or source.get_type_name() != "Add":
        return False
    for port in range(2):
        mine, theirs = add.input_value(port).get_node(), source.input_value(port).get_node()
        while mine.get_type_name() == "Convert":
            mine = mine.input_value(0).get_node()
        while theirs.get_type_name() == "Convert":
            theirs = theirs.input_value(0).get_node()
        if mine.get_type_name() == "Constant" and theirs.get_type_name() == "Constant" and tuple(mine.get_output_shape(0)) == tuple(theirs.get_output_shape(0)):
            add.input(port).replace_source_output(opset.constant(np.asarray(theirs.get_data(), dtype=np.float32)).output(0))
            return True
    return False


def _bias_value(add: ov.Node) -> np.ndarray | None:
    """The Add's constant operand (possibly behind a Convert, e.g. FP16-compressed), float64."""
    for port in range(2):
        value = constant_value(add.input_value(port).get_node())
        if value is not None:
            return value
    return None


def _weight_path(layer: ov.Node, port: int) -> list[str]:
    """Op types between the dequantizing Multiply / FakeQuantize and the layer (nearest first)."""
    path, node = [], layer.input_value(port).get_node()
    while node.get_type_name() not in ("Multiply", "FakeQuantize", "Constant", "Subtract"):
        path.append(node.get_type_name())
        node = node.input_value(0).get_node()
    return path


def _sample_shape(shape: ov.PartialShape) -> tuple[int, ...]:
    if shape.rank.is_dynamic or any(dim.is_dynamic for dim in list(shape)[1:]):
        raise UnsupportedLayer(f"its activation shape {shape} is not static")
    return tuple(dim.get_length() for dim in list(shape)[1:])


def _pads(attributes: dict, spatial_in, spatial_out, kernel, strides, dilations) -> tuple[tuple[int, ...], tuple[int, ...]]:
    auto = str(attributes.get("auto_pad", "explicit")).lower()
    if auto in ("explicit", "notset"):
        return tuple(attributes["pads_begin"]), tuple(attributes["pads_end"])
    if auto == "valid":
        return (0,) * len(kernel), (0,) * len(kernel)
    begin, end = [], []
    for size, out, k, s, d in zip(spatial_in, spatial_out, kernel, strides, dilations):
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        low = total // 2 if auto == "same_upper" else total - total // 2
        begin.append(low)
        end.append(total - low)
    return tuple(begin), tuple(end)


def has_smooth_quant(model: ov.Model) -> bool:
    """Whether NNCF's SmoothQuant rescaled some layer's inputs (its Multiply nodes are named ``*smooth_quant*``;
    the transformer model type applies it)."""
    return any(op.get_type_name() == "Multiply" and "smooth" in op.get_friendly_name().lower() for op in model.get_ordered_ops())
