"""How images become the model's input: the value range, per-channel mean and scale, and the layout.

Every source makes images in [0, 1], NCHW. :class:`InputSpec` maps them the way OpenVINO's tools describe
a model's input (``ovc`` / ``benchmark_app``): linearly onto ``--input-range LOW,HIGH``, then
``(x - mean) / scale`` per channel (``--mean-values``, ``--scale-values``, in the units of that range:
``--input-range 0,255 --mean-values [123.675,116.28,103.53] --scale-values [58.395,57.12,57.375]`` is
ImageNet's normalisation), then into ``--layout`` (NCHW or NHWC). A model with its preprocessing embedded
in the IR takes the images as they are: give none of these.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from evoquant.errors import EvoquantError

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class InputSpec:
    value_range: tuple[float, float] = (0.0, 1.0)
    mean_values: tuple[float, ...] | None = None
    scale_values: tuple[float, ...] | None = None
    layout: str = "NCHW"

    def __post_init__(self):
        low, high = self.value_range
        if not low < high:
            raise EvoquantError(f"the input range must be LOW,HIGH with LOW < HIGH, got {self.value_range}")
        if self.layout not in LAYOUTS:
            raise EvoquantError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.scale_values is not None and any(not value > 0 for value in self.scale_values):
            raise EvoquantError(f"--scale-values must be positive, got {list(self.scale_values)}")

    @property
    def is_plain(self) -> bool:
        """Only a linear range map, NCHW (what every source does by itself)."""
        return self.mean_values is None and self.scale_values is None and self.layout == "NCHW"

    def source_shape(self, model_shape: Sequence[int]) -> tuple[int, ...]:
        """The (C, H, W) a source must make for a model whose per-sample input is ``model_shape``."""
        shape = tuple(int(d) for d in model_shape)
        if self.layout == "NHWC":
            if len(shape) != 3:
                raise EvoquantError(f"--layout NHWC needs an image input (H, W, C); the model takes {shape}")
            return (shape[2], shape[0], shape[1])
        return shape

    def apply(self, images: np.ndarray) -> np.ndarray:
        """Images already in ``value_range`` (N, C, H, W) → the model's input."""
        if self.is_plain:
            return images
        channels = images.shape[1]
        out = images
        for values, name in ((self.mean_values, "--mean-values"), (self.scale_values, "--scale-values")):
            if values is not None and len(values) not in (1, channels):
                raise EvoquantError(f"{name} has {len(values)} values; the model's input has {channels} channels")
        if self.mean_values is not None:
            out = out - np.asarray(self.mean_values, dtype=np.float32).reshape(1, -1, 1, 1)
        if self.scale_values is not None:
            out = out / np.asarray(self.scale_values, dtype=np.float32).reshape(1, -1, 1, 1)
        if self.layout == "NHWC":
            out = out.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(out, dtype=np.float32)

    def draw(self, source, n: int, model_shape: Sequence[int], *, seed: int):
        """``n`` images (and labels) from ``source`` as the model takes them."""
        from evoquant.data import Batch

        batch = source.sample(n, self.source_shape(model_shape), seed=seed, value_range=tuple(self.value_range))
        return batch if self.is_plain else Batch(self.apply(batch.images), batch.labels)


def parse_values(text: str | Sequence[float] | None, option: str) -> tuple[float, ...] | None:
    """``[123.675,116.28,103.53]``, ``123.675,116.28,103.53`` or ``input[...]`` (a leading input name is
    ignored: evoquant models have one input), as ``ovc`` spells mean and scale values."""
    if text is None:
        return None
    if not isinstance(text, str):
        values = tuple(float(value) for value in text)
    else:
        body = text.strip()
        if "[" in body:
            if not body.endswith("]"):
                raise EvoquantError(f"{option} {text!r}: unbalanced brackets (e.g. [123.675,116.28,103.53])")
            body = body[body.index("[") + 1 : -1]
        try:
            values = tuple(float(part) for part in re.split(r"[,\s]+", body) if part)
        except ValueError:
            raise EvoquantError(f"{option} must be numbers, one per channel, e.g. [123.675,116.28,103.53], got {text!r}") from None
    if not values or not all(np.isfinite(values)):
        raise EvoquantError(f"{option} must be finite numbers, one per channel, got {text!r}")
    return values


def parse_layout(text: str | None) -> str | None:
    """``NCHW``, ``nhwc``, ``[NHWC]``, ``input[NHWC]`` or ``input(nhwc)``."""
    if text is None:
        return None
    match = re.fullmatch(r"\s*(?:[\w.:/-]*[\[(])?\s*([A-Za-z?.]+)\s*[\])]?\s*", text)
    layout = match.group(1).upper() if match else ""
    if layout not in LAYOUTS:
        raise EvoquantError(f"--layout must be NCHW or NHWC (e.g. [NHWC]), got {text!r}")
    return layout
