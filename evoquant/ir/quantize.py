"""The one place evoquant calls ``nncf.quantize``: W8A8 or W4A8, on any target device NNCF knows.

4-bit weights: NNCF's CPU target refuses them, its NPU target takes
``weights_quantization_params=QuantizationParameters(num_bits=4)`` and saves i4 weights in [-7, 7]
(Constant(i4) → Convert → Multiply), which the CPU plugin runs (shared/CONTEXT.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import openvino as ov

from evoquant.errors import EvoquantError
from evoquant.ir.runtime import _last_line

WEIGHT_BITS = (4, 8)
TARGET_DEVICES = ("CPU", "GPU", "NPU", "ANY")
MODEL_TYPES = ("transformer",)


@dataclass(frozen=True)
class QuantizeSettings:
    """What NNCF is asked for; ``target_device=None`` picks CPU for 8-bit and NPU for 4-bit weights."""

    weight_bits: int = 8
    target_device: str | None = None
    model_type: str | None = None
    preset: str = "performance"
    fast_bias_correction: bool = True
    ignored_scope: tuple[str, ...] = ()

    def __post_init__(self):
        if self.weight_bits not in WEIGHT_BITS:
            raise EvoquantError(f"--weight-bits must be 4 or 8, got {self.weight_bits}")
        if self.target_device is not None and self.target_device.upper() not in TARGET_DEVICES:
            raise EvoquantError(f"unknown target device {self.target_device!r}; choose from {', '.join(TARGET_DEVICES)}")
        if self.weight_bits == 4 and self.target_device is not None and self.target_device.upper() == "CPU":
            raise EvoquantError("NNCF's CPU target refuses 4-bit weights: use --target-device NPU (the CPU plugin runs the result)")
        if self.model_type is not None and self.model_type.lower() not in MODEL_TYPES:
            raise EvoquantError(f"unknown model type {self.model_type!r}; choose transformer (or leave it out)")

    @property
    def device(self) -> str:
        if self.target_device is not None:
            return self.target_device.upper()
        return "NPU" if self.weight_bits == 4 else "CPU"


def nncf_quantize(model: ov.Model, items: Sequence[np.ndarray], settings: QuantizeSettings) -> ov.Model:
    """``nncf.quantize`` with ``settings`` on calibration ``items`` (one NNCF item each)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    advanced = None
    if settings.weight_bits == 4:
        advanced = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(num_bits=4))
    arguments = {
        "subset_size": len(items),
        "preset": nncf.QuantizationPreset(settings.preset),
        "target_device": nncf.TargetDevice(settings.device),
        "fast_bias_correction": bool(settings.fast_bias_correction),
        "model_type": nncf.ModelType.TRANSFORMER if settings.model_type else None,
        "ignored_scope": _ignored_scope(nncf, list(settings.ignored_scope)) if settings.ignored_scope else None,
        "advanced_parameters": advanced,
    }
    try:
        return nncf.quantize(model, nncf.Dataset(list(items)), **arguments)
    except nncf.ValidationError as error:
        raise EvoquantError(f"NNCF rejected the settings: {_last_line(str(error))}") from None
    except (RuntimeError, ValueError) as error:
        raise EvoquantError(f"NNCF could not quantize the model: {_last_line(str(error))}") from None


def top1_agreement_with(reference: ov.Model, quantized: ov.Model, images: np.ndarray, sample_shape: tuple[int, ...]) -> float | None:
    """Share of ``images`` on which the quantized model's top-1 class equals the FP32 model's (classifiers:
    one output of shape (N, C)); None for other models."""
    from evoquant.ir.runtime import compile_ir, infer, with_sample_shape

    rank = quantized.outputs[0].get_partial_shape().rank
    if len(quantized.outputs) != 1 or rank.is_dynamic or rank.get_length() != 2:
        return None
    reference, quantized = with_sample_shape(reference, sample_shape), with_sample_shape(quantized, sample_shape)
    teacher = infer(compile_ir(reference, f32=True), images)[0]
    student = infer(compile_ir(quantized), images)[0]
    return float(np.mean(teacher.argmax(axis=1) == student.argmax(axis=1)))


def _ignored_scope(nncf, entries: list[str]):
    from evoquant.ir.mixed import parse_scope

    names, patterns, types = parse_scope(entries)
    return nncf.IgnoredScope(names=names, patterns=patterns, types=types)
