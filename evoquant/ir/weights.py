"""Find the quantized weights of an OpenVINO IR, by graph pattern, and describe their integer states.

Two forms exist in the wild (see shared/CONTEXT.md):

* **compressed** (what ``nncf.quantize`` saves today)::

      Constant(i8|u8|i4|u4) -> Convert(f32|f16) -> [Subtract(zero point)] -> Multiply(scale) -> consumer

* **fakequantize** (older tools, or NNCF with ``compress_weights=False``)::

      Constant(f32|f16) -> [Convert] -> FakeQuantize(levels, in_low, in_high, out_low, out_high) -> consumer

Either way a weight has integer *states* ``q`` and a map from states to the value the consumer sees. The
search only ever moves ``q`` inside ``[low, high]``, the range the quantizer used: NNCF's narrow range is
[-127, 127], but its overflow fix quantizes the first layer into [-63, 63] on purpose, and a min-max
quantizer puts each channel's extreme weight on the bound, so the bound is read off the tensor itself.
Names are never trusted (NNCF's constants are named automatically); only the pattern is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openvino as ov

from evoquant.errors import EvoquantError

INTEGER_TYPES = {"i8": (8, True), "u8": (8, False), "i4": (4, True), "u4": (4, False)}
# Ops that sit between a dequantized weight and the layer that uses it without changing its values.
_PASS_THROUGH = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Convert"}


@dataclass
class QuantizedWeight:
    """One quantized weight tensor and its integer states.

    ``states`` are the integers the quantizer chose (for the fakequantize form, the level index
    ``0..levels-1``); :meth:`values` maps states to what the consumer computes with, and
    :meth:`constant_data` to what must be written into the IR's Constant to realise them.
    """

    index: int
    consumer: str  # friendly name of the op that uses the weight (stable across NNCF)
    consumer_type: str
    consumer_port: int
    form: str  # "compressed" | "fakequantize"
    element_type: str  # i8/u8/i4/u4 for compressed; f32/f16 for fakequantize
    shape: tuple[int, ...]
    states: np.ndarray  # int32, `shape`
    low: int
    high: int
    scale: np.ndarray  # float64, broadcastable to `shape`: value step per state
    offset: np.ndarray  # float64, broadcastable: compressed -> zero point; fakequantize -> output_low
    constant_position: int  # index in model.get_ordered_ops() of the Constant to patch
    constant_name: str
    levels: int | None = None  # fakequantize only
    input_low: np.ndarray | None = None  # fakequantize only
    input_high: np.ndarray | None = None
    rounding_residual: np.ndarray | None = field(default=None, repr=False)  # x - states, x = exact state

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def granularity(self) -> str:
        """``per-tensor`` or ``per-channel (axis A, N)`` from the scale's shape."""
        scale_shape = np.shape(self.scale)
        axes = [axis for axis, dim in enumerate(scale_shape) if dim > 1]
        if not axes:
            return "per-tensor"
        return "per-channel (" + ", ".join(f"axis {a}: {scale_shape[a]}" for a in axes) + ")"

    def values(self, states: np.ndarray) -> np.ndarray:
        """The dequantized weight the consumer sees for integer ``states`` (float64)."""
        if self.form == "compressed":
            return (states - self.offset) * self.scale
        return self.offset + states * self.scale

    def constant_data(self, states: np.ndarray) -> np.ndarray:
        """What to store in the IR's Constant so that the graph computes with ``states``."""
        if self.form == "compressed":
            return states.astype(np.uint8 if self.element_type.startswith("u") else np.int8)
        # Centre of the level in the FakeQuantize input domain, so the op rounds it back to exactly `states`.
        step = (self.input_high - self.input_low) / (self.levels - 1)
        dtype = np.float16 if self.element_type == "f16" else np.float32
        return (self.input_low + states * step).astype(dtype)


@dataclass
class WeightTable:
    """All quantized weights of one IR, in graph order."""

    weights: list[QuantizedWeight]

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)

    def __getitem__(self, index: int) -> QuantizedWeight:
        return self.weights[index]

    @property
    def total_size(self) -> int:
        return sum(weight.size for weight in self.weights)

    @property
    def has_residuals(self) -> bool:
        return any(weight.rounding_residual is not None for weight in self.weights)


def find_quantized_weights(model: ov.Model) -> WeightTable:
    """Discover every quantized weight of ``model`` (both forms), in ``get_ordered_ops()`` order. A weight
    evoquant widened (4-bit states kept in an 8-bit constant: :mod:`evoquant.ir.storage`) keeps its 4-bit
    range, read from the model's record of it."""
    ops = list(model.get_ordered_ops())
    positions = {op.get_friendly_name(): i for i, op in enumerate(ops)}
    widened = widened_ranges(model)
    weights: list[QuantizedWeight] = []
    for op in ops:
        if op.get_type_name() != "Constant":
            continue
        found = _match_compressed(op) or _match_fakequantize(op)
        if found is None:
            continue
        if found.form == "compressed" and found.constant_name in widened:
            low, high = widened[found.constant_name]
            if int(found.states.min()) < low or int(found.states.max()) > high:
                raise EvoquantError(f"{found.consumer}: its weight states leave the 4-bit range [{low}, {high}] recorded for them "
                                    "(the IR was edited after evoquant wrote it)")
            found.low, found.high = low, high
        found.index = len(weights)
        found.constant_position = positions[op.get_friendly_name()]
        weights.append(found)
    return WeightTable(weights)


#: Where a model records the weights evoquant widened: ``rt_info`` path, value a JSON object
#: ``{constant name: [low, high]}`` (the states' 4-bit range).
WIDENED_RECORD = ("evoquant", "widened_weights")


def widened_ranges(model: ov.Model) -> dict[str, tuple[int, int]]:
    """The 4-bit ranges of the weights evoquant stored in 8-bit constants, by constant name ({} if none)."""
    import json

    if not model.has_rt_info(list(WIDENED_RECORD)):
        return {}
    try:
        record = json.loads(model.get_rt_info(list(WIDENED_RECORD)).astype(str))
        return {str(name): (int(low), int(high)) for name, (low, high) in record.items()}
    except (ValueError, TypeError, AttributeError):
        raise EvoquantError(f"the model's rt_info {'/'.join(WIDENED_RECORD)} is not a record evoquant wrote") from None


#: Layers that take a weight, and the input ports a constant weight can sit on.
WEIGHTED_OPS = {
    "Convolution": (1,),
    "GroupConvolution": (1,),
    "ConvolutionBackpropData": (1,),
    "GroupConvolutionBackpropData": (1,),
    "MatMul": (0, 1),
}


@dataclass(frozen=True)
class UnmatchedLayer:
    """A layer with a constant weight that evoquant does not refine, and why."""

    name: str
    type: str
    port: int
    reason: str


def find_unmatched_layers(model: ov.Model, table: WeightTable) -> list[UnmatchedLayer]:
    """Every weighted layer (Convolution, GroupConvolution, MatMul, ConvolutionBackpropData) whose input
    comes from a Constant but is not in ``table``, with the reason. Nothing is skipped silently."""
    matched = {(weight.consumer, weight.consumer_port) for weight in table}
    unmatched = []
    for op in model.get_ordered_ops():
        ports = WEIGHTED_OPS.get(op.get_type_name(), ())
        for port in ports:
            if port >= op.get_input_size() or (op.get_friendly_name(), port) in matched:
                continue
            reason = _unmatched_reason(op.input_value(port).get_node())
            if reason is not None:
                unmatched.append(UnmatchedLayer(op.get_friendly_name(), op.get_type_name(), port, reason))
    return unmatched


def _unmatched_reason(node: ov.Node) -> str | None:
    """Why the constant behind a weight input is not a refinable quantized weight; None: no constant there."""
    path = []
    while node.get_type_name() != "Constant":
        kind = node.get_type_name()
        if kind not in _PASS_THROUGH | {"Multiply", "Subtract", "FakeQuantize"}:
            return None  # an activation (e.g. attention's Q·Kᵀ), not a weight
        path.append(kind)
        # Follow the data input: a dequantizing Multiply/Subtract has its scale or zero point on a Constant.
        inputs = [node.input_value(i).get_node() for i in range(node.get_input_size())]
        if kind in ("Multiply", "Subtract"):
            non_constant = [n for n in inputs if n.get_type_name() != "Constant"]
            node = non_constant[0] if non_constant else inputs[0]
        else:
            node = inputs[0]
    element_type = node.get_element_type().get_type_name()
    if element_type in INTEGER_TYPES:
        return f"{element_type} weight through {' <- '.join(path) or 'nothing'}: not a pattern evoquant recognises"
    if "FakeQuantize" in path:
        return "FakeQuantize on the weight with non-constant ranges or a shared weight"
    if len(consumers(node.output(0))) > 1:
        return f"{element_type} weight shared by several layers, not quantized"
    return f"not quantized ({element_type} weight)"


def require_quantized_weights(model: ov.Model, source: str) -> WeightTable:
    """Like :func:`find_quantized_weights`, but a model without any is a user error."""
    table = find_quantized_weights(model)
    if not table.weights:
        raise EvoquantError(
            f"{source} has no quantized weights (neither integer Constants nor FakeQuantize on weights): "
            "quantize it first, e.g. with nncf.quantize"
        )
    return table


def consumers(output: ov.Output) -> list[ov.Input]:
    """Inputs fed by ``output`` that use its values. ``ShapeOf`` only reads the shape: ``model.reshape``'s
    SmartReshape makes the flatten before a classifier read ``ShapeOf`` of the classifier's weight."""
    return [target for target in output.get_target_inputs() if target.get_node().get_type_name() not in ("ShapeOf",)]


def _single_consumer(node: ov.Node) -> ov.Node | None:
    targets = consumers(node.output(0))
    return targets[0].get_node() if len(targets) == 1 else None


def constant_value(node: ov.Node) -> np.ndarray | None:
    """Data of a Constant, possibly behind a Convert (f16 scales, u8 zero points)."""
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return _read_constant(node).astype(np.float64)


def _read_constant(node: ov.Node) -> np.ndarray:
    """A Constant's data with its logical shape; 4-bit types come packed two per byte, low nibble first."""
    element_type = node.get_element_type().get_type_name()
    shape = tuple(node.get_output_shape(0))
    data = np.asarray(node.get_data())
    if element_type in ("i4", "u4"):
        packed = data.view(np.uint8).ravel()
        nibbles = np.empty(packed.size * 2, dtype=np.uint8)
        nibbles[0::2] = packed & 0x0F
        nibbles[1::2] = packed >> 4
        values = nibbles[: int(np.prod(shape))].astype(np.int32)
        if element_type == "i4":
            values = np.where(values > 7, values - 16, values)
        return values.reshape(shape)
    return data.reshape(shape)


def _find_consumer(output: ov.Output) -> tuple[ov.Node, int] | None:
    """Follow shape-only ops to the layer that uses a weight; return it and the input port."""
    targets = consumers(output)
    while len(targets) == 1 and targets[0].get_node().get_type_name() in _PASS_THROUGH:
        targets = consumers(targets[0].get_node().output(0))
    if len(targets) != 1:
        return None
    return targets[0].get_node(), targets[0].get_index()


def _match_compressed(constant: ov.Node) -> QuantizedWeight | None:
    element_type = constant.get_element_type().get_type_name()
    if element_type not in INTEGER_TYPES:
        return None
    convert = _single_consumer(constant)
    if convert is None or convert.get_type_name() != "Convert":
        return None
    previous, node = convert, _single_consumer(convert)
    zero_point = None
    if node is not None and node.get_type_name() == "Subtract":
        zero_point = constant_value(node.input_value(1).get_node())
        if zero_point is None:
            return None
        previous, node = node, _single_consumer(node)
    if node is None or node.get_type_name() != "Multiply":
        return None
    chain_port = 0 if node.input_value(0).get_node().get_friendly_name() == previous.get_friendly_name() else 1
    scale = constant_value(node.input_value(1 - chain_port).get_node())
    if scale is None:
        return None
    consumer = _find_consumer(node.output(0))
    if consumer is None:
        return None
    states = _read_constant(constant).astype(np.int32)
    bits, signed = INTEGER_TYPES[element_type]
    low, high = _integer_bounds(states, bits, signed, symmetric=zero_point is None)
    return QuantizedWeight(
        index=-1,
        consumer=consumer[0].get_friendly_name(),
        consumer_type=consumer[0].get_type_name(),
        consumer_port=consumer[1],
        form="compressed",
        element_type=element_type,
        shape=tuple(states.shape),
        states=states,
        low=low,
        high=high,
        scale=scale,
        offset=zero_point if zero_point is not None else np.zeros(1),
        constant_position=-1,
        constant_name=constant.get_friendly_name(),
    )


def _integer_bounds(states: np.ndarray, bits: int, signed: bool, *, symmetric: bool) -> tuple[int, int]:
    """The state range the quantizer used.

    Symmetric signed quantizers: the smallest ``2**k - 1`` that covers the tensor's largest magnitude (a
    min-max quantizer puts every channel's extreme on the bound, so this recovers NNCF's [-127, 127] and its
    first-layer [-63, 63] or [-64, 64]); -128 is allowed only if already present (full-range quantizers). Asymmetric or
    unsigned quantizers use the whole type range.
    """
    type_low, type_high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if not (signed and symmetric) or states.size == 0:
        return type_low, type_high
    magnitude = int(np.abs(states).max())
    high = _symmetric_bound(magnitude, type_high)
    low = type_low if int(states.min()) == type_low else -high
    return low, high


def _symmetric_bound(magnitude: int, cap: int) -> int:
    """The symmetric bound a quantizer used, from the largest state magnitude it produced.

    Narrow-range quantizers put extremes on ``2**k - 1`` (63, 127, ...). NNCF's overflow fix halves the first
    layer's range inside a 255-level grid, so its extremes land on 63.5 and round to 64 (measured on the
    zoo): a magnitude of exactly ``2**k`` below the cap is that half range, not a sign of the full one.
    """
    value = 1
    while value < magnitude:
        if magnitude == value + 1 and magnitude < cap:
            return magnitude
        value = value * 2 + 1
    return min(value, cap)


def _match_fakequantize(constant: ov.Node) -> QuantizedWeight | None:
    element_type = constant.get_element_type().get_type_name()
    if element_type not in ("f32", "f16", "bf16"):
        return None
    targets = consumers(constant.output(0))
    if len(targets) == 1 and targets[0].get_node().get_type_name() == "Convert":
        targets = consumers(targets[0].get_node().output(0))
    # The weight is the FakeQuantize's data input (port 0); its range Constants feed ports 1-4.
    if len(targets) != 1 or targets[0].get_index() != 0 or targets[0].get_node().get_type_name() != "FakeQuantize":
        return None
    node = targets[0].get_node()
    bounds = [constant_value(node.input_value(port).get_node()) for port in range(1, 5)]
    if any(bound is None for bound in bounds):
        return None
    input_low, input_high, output_low, output_high = bounds
    levels = int(node.get_levels())
    consumer = _find_consumer(node.output(0))
    if consumer is None:
        return None
    weight = _read_constant(constant).astype(np.float64)
    span = np.where(input_high > input_low, input_high - input_low, 1.0)
    exact = (np.clip(weight, input_low, input_high) - input_low) / span * (levels - 1)
    states = np.rint(exact).astype(np.int32)
    symmetric = levels % 2 == 1 and np.allclose(input_low, -input_high)
    if symmetric:
        centre = (levels - 1) // 2
        half = _symmetric_bound(int(np.abs(states - centre).max()), centre)
        low, high = centre - half, centre + half
    else:
        low, high = 0, levels - 1
    return QuantizedWeight(
        index=-1,
        consumer=consumer[0].get_friendly_name(),
        consumer_type=consumer[0].get_type_name(),
        consumer_port=consumer[1],
        form="fakequantize",
        element_type=element_type,
        shape=tuple(weight.shape),
        states=states,
        low=low,
        high=high,
        scale=(output_high - output_low) / (levels - 1),
        offset=output_low,
        constant_position=-1,
        constant_name=constant.get_friendly_name(),
        levels=levels,
        input_low=input_low,
        input_high=input_high,
        rounding_residual=exact - states,
    )


def reference_weight(weight: QuantizedWeight, reference_ops: dict[str, ov.Node]) -> np.ndarray | None:
    """The FP32 reference's weight for ``weight`` (float64, ``weight.shape``), or None where it has none.

    ``reference_ops`` maps the reference model's friendly names to its ops. Matched by the consumer's name
    and input port (NNCF keeps layer names), through reshapes, converts and a weight FakeQuantize, then
    checked by size. SmoothQuant'ed layers match too: their FP32 weight is not states x scale (callers that
    need the rounding relation check it themselves)."""
    layer = reference_ops.get(weight.consumer)
    if layer is None or weight.consumer_port >= layer.get_input_size():
        return None
    source = layer.input_value(weight.consumer_port).get_node()
    while source.get_type_name() in _PASS_THROUGH | {"FakeQuantize"}:
        source = source.input_value(0).get_node()
    if source.get_type_name() != "Constant":
        return None
    fp_weight = _read_constant(source).astype(np.float64)
    return fp_weight.reshape(weight.shape) if fp_weight.size == weight.size else None


def attach_reference(table: WeightTable, reference: ov.Model) -> int:
    """Fill each compressed weight's ``rounding_residual`` from the FP32 reference; return how many matched.

    The residual ``w / scale + zero_point - q`` tells how close nearest rounding was to a tie (|r| near 0.5),
    which the tie mutation exploits. Weights are matched by their consumer's name and input port (NNCF
    keeps layer names), then checked by size; unmatched weights simply get no residual.
    """
    by_name = {op.get_friendly_name(): op for op in reference.get_ordered_ops()}
    matched = 0
    for weight in table:
        if weight.rounding_residual is not None:
            matched += 1
            continue
        fp_weight = reference_weight(weight, by_name)
        if fp_weight is None:
            continue
        exact = fp_weight / weight.scale + weight.offset
        residual = exact - weight.states
        if np.abs(residual).max() > 1.0 + 1e-3 and np.mean(np.abs(residual) <= 0.5 + 1e-3) < 0.9:
            continue  # not the weight these states were rounded from
        weight.rounding_residual = np.clip(residual, -0.5, 0.5)
        matched += 1
    return matched
