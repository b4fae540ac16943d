"""Where a quantized model's error comes from: its weights or its activations, and which layers.

The questions AIMET's QuantAnalyzer asks, for an OpenVINO IR against its FP32 original, on any images:

- the model as it is;
- with every quantized weight (and the bias after it) back in FP32: only the activation quantizers left,
  the floor no weight rounding reaches (short of compensating the activations);
- with every activation quantizer removed: only the weights left;
- with both: nothing quantized, which must be (close to) zero, or the reference is not the model the
  quantized one was made from;
- per activation quantizer, the model with that one removed: which activations cost most (their ranges,
  or a candidate to leave in float);
- per quantized weight, the model with that one weight (and its bias) back in FP32. Above the model's own
  figure: the later layers compensate this one (refine's reconstruction fits each layer to the ones before),
  and keeping it in float alone would not help; far below: the layer to keep at 8 bits or in float
  (``evoquant quantize --ignored-scope``).

Measured on the zoo in docs/reconstruct.md ("Where the rest of the KL is").
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from evoquant.errors import EvoquantError


@dataclass
class LayerSensitivity:
    """One quantized weight: the model's error with only this weight (and its bias) back in FP32."""

    layer: str
    type: str
    shape: tuple[int, ...]
    element_type: str
    error_fp32: float | None  # None where the reference has no FP32 weight that these states stand for
    reason: str | None = None


@dataclass
class QuantizerSensitivity:
    """One activation quantizer: the model's error with only this quantizer removed."""

    quantizer: str
    error_without: float


@dataclass
class AnalysisResult:
    """What :func:`analyze` measured; ``metric`` is ``kl`` (classifiers: KL(FP32 ‖ model)) or ``mse``
    (normalized MSE of all outputs)."""

    model: str
    reference: str
    data: str
    images: int
    metric: str
    quantized: float
    fp32_weights: float
    no_activation_quantizers: float
    nothing_quantized: float
    weights: int
    weights_replaced: int
    activation_quantizers: int
    layers: list[LayerSensitivity] = field(default_factory=list)
    activations: list[QuantizerSensitivity] = field(default_factory=list)
    accuracy: dict[str, float] | None = None  # with labelled images: top-1 of the reference and the model
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        from evoquant.report import _number, format_rows

        lines = [f"{self.metric} to the FP32 reference on {self.images} images of {self.data}:"]
        rows = [("as quantized", _number(self.quantized)),
                (f"FP32 weights ({self.weights_replaced} of {self.weights}): activations only", _number(self.fp32_weights)),
                (f"no activation quantizers ({self.activation_quantizers}): weights only", _number(self.no_activation_quantizers)),
                ("nothing quantized (a check: ~0)" if self.weights_replaced == self.weights
                 else f"no activation quantizers, FP32 weights ({self.weights_replaced} of {self.weights})", _number(self.nothing_quantized))]
        lines.append(format_rows(("model", self.metric), rows))
        if self.weights_replaced < self.weights:
            lines.append(f"{self.weights - self.weights_replaced} weight(s) have no FP32 weight their states stand for (SmoothQuant rescales weights and "
                         "their activations together): they stay quantized in every line")
        if self.accuracy:
            lines.append("top-1 accuracy: " + ", ".join(f"{name} {100 * value:.2f} %" for name, value in self.accuracy.items()))
        if self.layers:
            lines.append("")
            lines.append(f"one weight back in FP32 (most sensitive first; above {_number(self.quantized)}: later layers compensate it):")
            ranked = sorted(self.layers, key=lambda layer: np.inf if layer.error_fp32 is None else layer.error_fp32)
            lines.append(format_rows(("layer", "type", "shape", "weights", self.metric, "change"),
                                     [(layer.layer, layer.type, "x".join(map(str, layer.shape)), layer.element_type,
                                       _number(layer.error_fp32) if layer.error_fp32 is not None else "-",
                                       f"{100 * (layer.error_fp32 - self.quantized) / self.quantized:+.0f}%" if layer.error_fp32 is not None and self.quantized > 0 else (layer.reason or "-"))
                                      for layer in ranked]))
        if self.activations:
            lines.append("")
            shown = sorted(self.activations, key=lambda quantizer: quantizer.error_without)[:10]
            lines.append(f"one activation quantizer removed (the {len(shown)} that matter most of {len(self.activations)}):")
            lines.append(format_rows(("quantizer", self.metric, "change"),
                                     [(quantizer.quantizer, _number(quantizer.error_without),
                                       f"{100 * (quantizer.error_without - self.quantized) / self.quantized:+.0f}%" if self.quantized > 0 else "-") for quantizer in shown]))
        return "\n".join(lines)


def analyze(
    model: str | os.PathLike,
    *,
    reference: str | os.PathLike,
    data="fractal",
    images: int = 512,
    layers: bool = True,
    input_shape: Sequence[int] | str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    mean_values: Sequence[float] | str | None = None,
    scale_values: Sequence[float] | str | None = None,
    layout: str | None = None,
    seed: int = 0,
    progress: bool = False,
) -> AnalysisResult:
    """Split a quantized IR's error against its FP32 reference into weights, activations and layers.

    Args:
        model: the quantized IR (.xml); never modified.
        reference: the FP32 IR it was quantized from (FP16-compressed weights are fine).
        data: the images to score on: a source spec (``fractal``, ``gan:DIR``, ``data.npz``, a folder, ...),
            a ``DataSource``, a ``Batch`` or an (N, C, H, W) array in the model's input. Real labelled data
            (an .npz with labels, a folder per class) adds top-1 accuracy.
        images: how many to draw (a finite source must hold that many; an array or Batch is used whole).
        layers: also score the model with each quantized weight alone back in FP32, and with each activation
            quantizer alone removed (one compile each).
        input_shape: the model's input shape, batch first, for a dynamic input the data does not fix.
        value_range, mean_values, scale_values, layout: the model's input, as for :func:`evoquant.quantize`.
        seed: the draw.
        progress: a progress bar over the compiles.

    Every variant is compiled with f32 inference precision (OpenVINO's default is bf16 on CPUs that have
    it), so that only the quantization differs between them.

    Raises:
        EvoquantError: a model without quantized weights, a quantized reference, outputs or input shapes
            that differ, or data that cannot feed the model.
    """
    from evoquant.api import _as_batch, _check_reference, _data_sample_shape, input_spec
    from evoquant.fitness.objectives import kl_to_teacher, looks_like_classifier, normalized_mse
    from evoquant.ir.analysis import activation_quantizer_names, with_fp32_weights, without_activation_quantizers
    from evoquant.ir.runtime import compile_ir, infer, output_signature, parse_input_shape, read_ir, with_sample_shape
    from evoquant.ir.runtime import input_shape as sample_shape_of
    from evoquant.ir.weights import find_quantized_weights, require_quantized_weights

    started = time.perf_counter()
    if images < 1:
        raise EvoquantError(f"images must be 1 or more, got {images}")
    original = read_ir(model)
    table = require_quantized_weights(original, str(model))
    override = parse_input_shape(input_shape)
    inputs = input_spec(value_range, mean_values, scale_values, layout)
    shape = sample_shape_of(original, override, data_shape=_data_sample_shape(data, inputs.layout))
    teacher_model = read_ir(reference)
    teacher_shape = sample_shape_of(teacher_model, override, data_shape=shape, role="the reference")
    if teacher_shape != shape:
        raise EvoquantError(f"the reference takes inputs of shape {teacher_shape} but the quantized model takes {shape}")
    if find_quantized_weights(teacher_model):
        raise EvoquantError(f"the reference {reference} is itself quantized: give the FP32 model the quantized one was made from")
    _check_reference(original, teacher_model)
    data_label, batch, labels_are_classes = _as_batch(_finite_share(data, images), shape, images, seed=seed, inputs=inputs)
    classifier = looks_like_classifier(output_signature(original))
    score = kl_to_teacher if classifier else normalized_mse

    teacher = infer(compile_ir(with_sample_shape(teacher_model, shape), f32=True), batch.images)

    def error(edited) -> float:
        return float(score(infer(compile_ir(with_sample_shape(edited, shape), f32=True), batch.images), teacher))

    quantizer_names = activation_quantizer_names(original) if layers else []
    bar = _bar(progress, 4 + (len(table) + len(quantizer_names) if layers else 0))
    quantized_outputs = infer(compile_ir(with_sample_shape(original, shape), f32=True), batch.images)
    quantized = float(score(quantized_outputs, teacher))
    bar.update(1)
    edited, replaced = with_fp32_weights(original.clone(), teacher_model)
    fp32 = error(edited)
    bar.update(1)
    edited, removed = without_activation_quantizers(original.clone())
    no_activations = error(edited)
    bar.update(1)
    edited, _ = without_activation_quantizers(with_fp32_weights(original.clone(), teacher_model)[0])
    nothing = error(edited)
    bar.update(1)
    sensitivities = []
    if layers:
        for index, weight in enumerate(table):
            edited, one = with_fp32_weights(original.clone(), teacher_model, only=index)
            value = error(edited) if one else None  # none replaced: no FP32 weight these states stand for
            sensitivities.append(LayerSensitivity(weight.consumer, weight.consumer_type, tuple(weight.shape), weight.element_type, value,
                                                  None if value is not None else "no FP32 weight these states stand for"))
            bar.update(1)
    activations = []
    for name in quantizer_names:
        activations.append(QuantizerSensitivity(name, error(without_activation_quantizers(original.clone(), only=name)[0])))
        bar.update(1)
    bar.close()
    accuracy = None
    if classifier and labels_are_classes and batch.labels is not None:
        accuracy = {"reference": float(np.mean(teacher[0].argmax(1) == batch.labels)), "model": float(np.mean(quantized_outputs[0].argmax(1) == batch.labels))}
    return AnalysisResult(str(model), str(reference), data_label, len(batch.images), "kl" if classifier else "mse", quantized, fp32, no_activations, nothing,
                          len(table), replaced, removed, sensitivities, activations, accuracy, round(time.perf_counter() - started, 1))


def _finite_share(data, images: int):
    """The source of a spec, checked first: a finite one (an .npz, a folder) must hold ``images``."""
    if isinstance(data, (str, Path)):
        from evoquant.data import load_source

        source = load_source(str(data))
        if source.finite and len(source) < images:
            raise EvoquantError(f"{data} holds {len(source)} images; ask for at most that many (--images {len(source)})")
        return source
    return data


def _bar(progress: bool, total: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="analyze", unit="model", leave=False, disable=not progress)
