"""Activation quantizers: which FakeQuantize nodes quantize activations, what they clip, and widening them.

NNCF puts a FakeQuantize (levels, input low/high, output low/high) on each quantized layer's activation
input; its range comes from calibration statistics, and NNCF's default for activations is the *mean* of the
per-batch minima and maxima: with the one-image calibration batches users give it, a range about as wide as
an average image's largest activation, which clips every larger one (the zoo's quantizers: 1.2-2.3x below
the largest activation of 1,000 images). The range-refit stage (:mod:`evoquant.reconstruct.ranges`) widens
them: the same levels spread over a wider range (less clipping, coarser steps). Left alone: a weight's
FakeQuantize (its data input is a Constant, possibly through Convert). The quantizer on the model's input
(reached from a Parameter through preprocessing only) is not an activation quantizer: its range should be
the input's declared range (the user's ``--input-range``), which NNCF estimates from the calibration images
instead — from synthetic images that rarely reach full brightness it clips real ones
(:func:`input_range_factors` widens it to the declared range).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as opset

#: Ops a model input may pass on its way to the input's quantizer (preprocessing: convert, mean, scale).
_PREPROCESSING = {"Convert", "Multiply", "Divide", "Add", "Subtract", "Reshape", "Transpose"}


@dataclass(frozen=True)
class RangeScaling:
    """What :func:`scale_activation_ranges` did: how many activation quantizers it could scale, and the names
    of those it could not (a range that is not a constant: the report lists them, nothing is dropped silently)."""

    scaled: int
    not_constant: tuple[str, ...] = ()


def _constant_data(output: ov.Output) -> np.ndarray | None:
    """The value behind an input, when it is a Constant or a Convert of one (an FP16-compressed IR's form)."""
    node = output.get_node()
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float64)


def _is_weight(output: ov.Output) -> bool:
    node = output.get_node()
    while node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def _is_model_input(output: ov.Output) -> bool:
    """Whether ``output`` is computed from a model input by preprocessing ops (and constants) alone."""
    node = output.get_node()
    while node.get_type_name() in _PREPROCESSING:
        data = [value for value in node.input_values() if not _is_weight(value)]
        if len(data) != 1:
            return False
        node = data[0].get_node()
    return node.get_type_name() == "Parameter"


def activation_quantizers(model: ov.Model) -> list[ov.Node]:
    """The FakeQuantize nodes of ``model`` that quantize activations, in graph order (see the module doc)."""
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize":
            continue
        data = node.input_value(0)
        if _is_weight(data) or _is_model_input(data):
            continue
        found.append(node)
    return found


def data_quantizers(model: ov.Model) -> list[ov.Node]:
    """Every FakeQuantize of ``model`` on data rather than on a weight: :func:`activation_quantizers` and
    :func:`input_quantizers` together, in graph order."""
    return [node for node in model.get_ordered_ops() if node.get_type_name() == "FakeQuantize" and not _is_weight(node.input_value(0))]


def input_quantizers(model: ov.Model) -> list[ov.Node]:
    """The FakeQuantize nodes of ``model`` on a model input (reached from a Parameter through preprocessing
    ops only), in graph order."""
    return [node for node in model.get_ordered_ops()
            if node.get_type_name() == "FakeQuantize" and not _is_weight(node.input_value(0)) and _is_model_input(node.input_value(0))]


def _bounds(node: ov.Node) -> list[np.ndarray] | None:
    """A quantizer's four range bounds (input low/high, output low/high), or None where one is not a constant."""
    bounds = [_constant_data(node.input_value(port)) for port in (1, 2, 3, 4)]
    return None if any(bound is None for bound in bounds) else bounds


def constant_range_quantizers(model: ov.Model) -> tuple[list[str], list[str]]:
    """The names of the activation quantizers whose range is a constant (the ones a factor can scale), and of
    those whose range is not."""
    scalable, not_constant = [], []
    for node in activation_quantizers(model):
        (scalable if _bounds(node) is not None else not_constant).append(node.get_friendly_name())
    return scalable, not_constant


def scale_activation_ranges(model: ov.Model, factors: float | Mapping[str, float]) -> RangeScaling:
    """Multiply activation quantizers' four range bounds in ``model`` (in place): every one by ``factors``
    (a number), or each named one by its own (a mapping from friendly name, which may also name the model
    input's quantizers: :func:`input_quantizers`; the rest stay as they are).

    Scaling low and high together keeps zero where it was on the level grid (an asymmetric range stays
    zero-aligned) and the quantizer's output in the units of its input."""
    scaled, not_constant, changed = 0, [], False
    replacements: dict = {}  # (bound's source node, factor) -> its scaled replacement: a bound shared by ports stays shared
    quantizers = activation_quantizers(model)
    if isinstance(factors, Mapping):
        quantizers += input_quantizers(model)
    for node in quantizers:
        factor = factors.get(node.get_friendly_name(), 1.0) if isinstance(factors, Mapping) else factors
        if not np.isfinite(factor) or factor <= 0:
            raise ValueError(f"a range factor must be positive, got {factor} for {node.get_friendly_name()}")
        bounds = _bounds(node)
        if bounds is None:
            not_constant.append(node.get_friendly_name())
            continue
        scaled += 1
        if factor == 1.0:
            continue
        for port, bound in zip((1, 2, 3, 4), bounds):
            source = node.input_value(port)
            key = (source.get_node().get_instance_id(), factor)
            if key not in replacements:
                replacements[key] = _scaled_bound(source, bound * factor)
            node.input(port).replace_source_output(replacements[key])
        changed = True
    if changed:
        model.validate_nodes_and_infer_types()
    return RangeScaling(scaled, tuple(not_constant))


def _scaled_bound(source: ov.Output, value: np.ndarray) -> ov.Output:
    """A Constant holding ``value`` for the bound ``source``, named after the node it replaces: the written IR
    does not depend on how many nodes this process made before (auto-generated names do), so a resumed run
    writes the same bytes as an uninterrupted one."""
    name = source.get_node().get_friendly_name()
    constant = opset.constant(value.astype(np.float32))
    constant.set_friendly_name(name)
    if source.get_element_type() == ov.Type.f32:
        return constant.output(0)
    converted = opset.convert(constant, source.get_element_type())
    converted.set_friendly_name(f"{name}/convert")
    return converted.output(0)


def observed_range_factors(model: ov.Model, images: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Per activation quantizer (friendly name), the factor that makes its range cover every value its input
    takes on ``images`` (as ``model`` computes them): ``max(1, largest / high, smallest / low)``, so a range
    is only ever widened. Quantizers NNCF gave one shared range (the inputs of one Add, Concat or Multiply:
    all four bounds equal) keep sharing one: each takes the group's largest factor."""
    return _covering_factors(model, activation_quantizers, images, batch_size)


def input_range_factors(model: ov.Model, extremes: np.ndarray) -> dict[str, float]:
    """Per quantizer on the model's input (friendly name), the factor that makes its range cover the input's
    declared range: ``extremes`` are the images at the declared range's two ends (every pixel at the low end,
    every pixel at the high end) as the model takes them. Preprocessing in the graph is element-wise and
    linear, so each element's extremes are reached on those two images. Only ever widens."""
    return _covering_factors(model, input_quantizers, extremes, len(extremes))


def _covering_factors(model: ov.Model, find, images: np.ndarray, batch_size: int) -> dict[str, float]:
    """``max(1, largest / high, smallest / low)`` for each quantizer ``find(model)`` returns that has constant
    bounds, over the values its input takes on ``images``; a group sharing one range takes its largest."""
    from evoquant.ir.runtime import compile_ir

    copy = model.clone()
    quantizers = [(node, bounds) for node in find(copy) if (bounds := _bounds(node)) is not None]
    if not quantizers:
        return {}
    probe = ov.Model([opset.result(node.input_value(0)) for node, _ in quantizers], copy.get_parameters(), "range-probe")
    request = compile_ir(probe).create_infer_request()
    largest = np.full(len(quantizers), -np.inf)
    smallest = np.full(len(quantizers), np.inf)
    for start in range(0, len(images), batch_size):
        result = request.infer({0: images[start : start + batch_size]})
        for i, output in enumerate(request.model_outputs):
            values = result[output]
            largest[i] = max(largest[i], float(np.max(values)))
            smallest[i] = min(smallest[i], float(np.min(values)))
    factors, groups = {}, {}
    for (node, bounds), top, bottom in zip(quantizers, largest, smallest):
        low, high = float(np.min(bounds[0])), float(np.max(bounds[1]))
        factor = max(1.0, top / high if high > 0 else 1.0, bottom / low if low < 0 else 1.0)
        name = node.get_friendly_name()
        factors[name] = float(factor)
        groups.setdefault(tuple(bound.tobytes() for bound in bounds), []).append(name)
    for names in groups.values():
        shared = max(factors[name] for name in names)
        factors.update({name: shared for name in names})
    return factors
