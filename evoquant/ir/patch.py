"""Write integer states back into an IR: patch weight Constants in place (saving: :mod:`evoquant.paths`).

Only weight Constants change: the new Constant takes the old one's friendly name and element type, and
replaces its output, so every other node, attribute and rt_info entry of the model is untouched and the
result still runs INT8 kernels in stock OpenVINO.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.errors import EvoquantError
from evoquant.ir.weights import QuantizedWeight, WeightTable


class ConstantPatcher:
    """Swap weight Constants of one ``ov.Model`` in and out, cheaply and repeatedly.

    Evaluating a candidate means: patch, compile, restore. Restoring (rather than cloning the model for each
    candidate) keeps the model object reusable; ``compile_model`` takes its own copy, so a patched model can
    be compiled and immediately restored.
    """

    def __init__(self, model: ov.Model, table: WeightTable):
        self.model = model
        self.table = table
        ops = list(model.get_ordered_ops())
        self._current: list[ov.Node] = []
        for weight in table:
            node = ops[weight.constant_position]
            if node.get_type_name() != "Constant" or node.get_friendly_name() != weight.constant_name:
                raise EvoquantError("the weight table does not belong to this model (graph order differs)")
            self._current.append(node)
        self._originals = list(self._current)

    def apply(self, states: Mapping[int, np.ndarray]) -> None:
        """Make tensor ``i`` compute with ``states[i]`` (full-shape integer arrays); others stay as they are."""
        for index, tensor_states in states.items():
            weight = self.table[index]
            self._replace(index, _make_constant(weight, tensor_states))

    def restore(self) -> None:
        """Put every original Constant back."""
        for index, original in enumerate(self._originals):
            if self._current[index] is not original:
                self._replace(index, original)

    def _replace(self, index: int, new: ov.Node) -> None:
        old = self._current[index]
        new.set_friendly_name(old.get_friendly_name())
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        self._current[index] = new


def _make_constant(weight: QuantizedWeight, states: np.ndarray) -> ov.Node:
    states = np.asarray(states)
    if states.shape != weight.shape:
        raise ValueError(f"states for {weight.consumer} have shape {states.shape}, expected {weight.shape}")
    if states.min() < weight.low or states.max() > weight.high:
        raise ValueError(f"states for {weight.consumer} leave the quantizer's range [{weight.low}, {weight.high}]")
    data = weight.constant_data(states)
    element_type = getattr(ov.Type, weight.element_type) if weight.form == "compressed" else None
    if element_type is not None:
        return opset.constant(data, dtype=element_type)
    return opset.constant(data)
