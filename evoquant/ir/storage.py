"""How 4-bit weight states are stored: checked under several streams, widened to 8-bit constants where needed.

OpenVINO's CPU plugin (2026.4.1, this project's machines) computes a 1x1 Convolution whose weights are
decompressed in the graph -- ``Constant(i4/u4) -> Convert -> [Subtract] -> Multiply``, the form NNCF writes
every 4-bit weight in -- wrongly when the model is compiled for several streams (``NUM_STREAMS: 2``,
``PERFORMANCE_HINT: THROUGHPUT``, benchmark_app's default): ``benchmarks/w4_streams_repro.py`` shows it on a
single convolution, ``benchmarks/exec_modes.py`` on the zoo (W4A8 models classifying 8-76 % of the digits
right instead of 96-99 %). The same states in an 8-bit constant behind NNCF's activation FakeQuantize take
the plugin's int8 kernels and come out right under every setting.

So before an IR with 4-bit convolution weights is written, it is run with one stream, with two and with
the THROUGHPUT hint on a few images (:func:`settle_storage`; which of the two goes wrong, and whether,
changes from run to run). Where they disagree, or where the model has a 4-bit 1x1 convolution at all,
its convolutions' 4-bit constants become 8-bit constants holding the same states ("widened": same grid,
scales and zero points; those weights take twice the bytes), and the model's ``rt_info`` records each
widened weight's 4-bit range, so evoquant reading the IR again keeps the states on their 4-bit grid
(:func:`evoquant.ir.weights.widened_ranges`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset13 as opset

from evoquant.config import WEIGHT_STORAGE_MODES
from evoquant.errors import EvoquantError
from evoquant.ir.weights import WIDENED_RECORD, find_quantized_weights, widened_ranges

#: ``auto``: widen when the model has a 4-bit 1x1 convolution or computes differently with several streams;
#: ``keep``: never widen (a warning instead); ``widen``: always widen 4-bit convolution weights.
STORAGE_MODES = WEIGHT_STORAGE_MODES
#: Images the multi-stream check runs.
CHECK_IMAGES = 64
#: A relative output difference (max |several streams - 1 stream| / max |1 stream|) above this is a
#: disagreement; identical kernels give 0, the defect 0.9-1.9 on the zoo's W4A8 models.
TOLERANCE = 1e-3
#: Layers whose 4-bit weights are widened (4-bit MatMul weights -- transformers' -- compute right).
WIDENED_LAYERS = ("Convolution", "GroupConvolution")
#: The multi-stream settings checked against the one-stream default.
MULTISTREAM_SETTINGS = ({"NUM_STREAMS": 2}, {"PERFORMANCE_HINT": "THROUGHPUT"})


@dataclass(frozen=True)
class StorageCheck:
    """What :func:`settle_storage` found and did (the report's ``weight_storage``)."""

    mode: str
    four_bit: int  # 4-bit weight tensors in the model (convolutions')
    difference: float | None  # relative output difference, several streams vs one (the worse setting); None when not run
    widened: int = 0  # tensors now held in 8-bit constants
    difference_after: float | None = None  # ... the same check on the widened model
    change: float | None = None  # relative difference of the widened model from the 4-bit one, one stream each
    pointwise: int = 0  # of the 4-bit tensors, those of 1x1 Convolutions (the kernels the defect is known on)

    @property
    def disagrees(self) -> bool:
        return self.difference is not None and self.difference > TOLERANCE

    def warning(self) -> str | None:
        """The line a user must see, or None."""
        if not (self.disagrees or self.pointwise):
            return None
        version = ov.__version__.split("-")[0]
        why = (f"outputs off by {self.difference:.3g} of their range on {CHECK_IMAGES} images" if self.disagrees else
               f"its {self.pointwise} 4-bit 1x1 convolutions are the kernels it gets wrong, though this run's check agreed (it does not every run)")
        if not self.widened:
            return (f"OpenVINO {version} computes 4-bit convolution weights wrongly with several streams (NUM_STREAMS 2 / THROUGHPUT; {why}); "
                    "written as they are (--weight-storage keep): deploy it with one stream, or write it with --weight-storage auto")
        still = "" if (self.difference_after or 0.0) <= TOLERANCE else f"; the widened model still differs with several streams ({self.difference_after:.3g}): deploy it with one stream"
        return (f"OpenVINO {version} computes 4-bit convolution weights wrongly with several streams (NUM_STREAMS 2 / THROUGHPUT; {why}), "
                f"so {self.widened} of them were written as 8-bit constants holding the same 4-bit states (twice their bytes; one-stream "
                f"outputs change by {self.change:.2g} of their range){still}")

    def to_dict(self) -> dict:
        return {"mode": self.mode, "four_bit_tensors": self.four_bit, "pointwise_tensors": self.pointwise, "multistream_difference": self.difference,
                "widened_tensors": self.widened, "multistream_difference_after": self.difference_after, "one_stream_change": self.change}


def four_bit_convolution_weights(model: ov.Model, layers: tuple[str, ...] = WIDENED_LAYERS) -> list:
    """The 4-bit compressed weights of ``model``'s ``layers`` (by default its convolutions: the ones
    :func:`widen` replaces)."""
    return [w for w in find_quantized_weights(model) if w.form == "compressed" and w.element_type in ("i4", "u4") and w.consumer_type in layers]


def widen(model: ov.Model, layers: tuple[str, ...] = WIDENED_LAYERS) -> int:
    """Hold ``model``'s 4-bit weights of ``layers`` (default: its convolutions) in 8-bit constants (same
    states, names and consumers), in place, and record their 4-bit ranges in its rt_info. Returns how many
    were widened."""
    weights = four_bit_convolution_weights(model, layers)
    if not weights:
        return 0
    ops = model.get_ordered_ops()
    record = dict(widened_ranges(model))
    for weight in weights:
        old = ops[weight.constant_position]
        new = opset.constant(weight.states.astype(np.int8 if weight.element_type == "i4" else np.uint8))
        new.set_friendly_name(old.get_friendly_name())
        for target in list(old.output(0).get_target_inputs()):
            target.replace_source_output(new.output(0))
        record[weight.constant_name] = [int(weight.low), int(weight.high)]
    model.validate_nodes_and_infer_types()
    model.set_rt_info(json.dumps(record, sort_keys=True), list(WIDENED_RECORD))
    return len(weights)


def multistream_difference(model: ov.Model, images: np.ndarray, one_stream: list[np.ndarray] | None = None) -> float:
    """max |outputs under a multi-stream setting - outputs with one stream| / max |outputs with one stream|,
    over every output and :data:`MULTISTREAM_SETTINGS`."""
    one = one_stream if one_stream is not None else _run(model, images)
    return max(_relative(_run(model, images, settings), one) for settings in MULTISTREAM_SETTINGS)


def _run(model: ov.Model, images: np.ndarray, settings: dict | None = None) -> list[np.ndarray]:
    from evoquant.ir.runtime import compile_ir, infer, static_batch

    batch = static_batch(model)
    return infer(compile_ir(model, settings=settings), images, batch_size=batch or len(images))


def settle_storage(model: ov.Model, images: np.ndarray, mode: str = "auto") -> StorageCheck:
    """Check ``model`` (with its 4-bit convolution weights) under several streams and, per ``mode``, widen it
    in place: ``auto`` widens when it has a 4-bit 1x1 Convolution (the defect's known kernel: a check that
    agrees once proves nothing, MobileNetV3-small's caught it in 3 of 6 runs) or when the check disagrees.
    Models without 4-bit convolution weights are returned untouched, unchecked."""
    from evoquant.ir.runtime import static_batch

    if mode not in STORAGE_MODES:
        raise EvoquantError(f"unknown weight storage {mode!r}; choose {', '.join(STORAGE_MODES)}")
    weights = four_bit_convolution_weights(model)
    if not weights:
        return StorageCheck(mode, 0, None)
    four_bit = len(weights)
    pointwise = sum(1 for w in weights if w.consumer_type == "Convolution" and all(size == 1 for size in w.shape[2:]))
    batch = static_batch(model) or 1
    images = np.ascontiguousarray(images[: max(batch, CHECK_IMAGES // batch * batch)])
    before = _run(model, images)
    difference = multistream_difference(model, images, before)
    if mode == "keep" or (mode == "auto" and difference <= TOLERANCE and not pointwise):
        return StorageCheck(mode, four_bit, difference, pointwise=pointwise)
    widened = widen(model)
    after = _run(model, images)
    return StorageCheck(mode, four_bit, difference, widened, multistream_difference(model, images, after), _relative(after, before), pointwise)


def _relative(outputs: list[np.ndarray], reference: list[np.ndarray]) -> float:
    scale = max(float(np.abs(r).max()) for r in reference) or 1.0
    return max(float(np.abs(o.astype(np.float64) - r).max()) for o, r in zip(outputs, reference)) / scale
