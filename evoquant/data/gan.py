"""The ``gan`` source: images from a generator, drawn from the seed (``gan:GEN_DIR``).

Specs:
    ``gan:GEN_DIR``        -- a generator directory written by ``evoquant gan train`` / ``gan distill``;
    ``gan:FILE``           -- an external generator (``.xml``, ``.onnx``, TorchScript ``.pt``) with its
                              metadata in a ``.json`` beside it (see :mod:`evoquant.gan.generator`).

Every call to :meth:`~evoquant.data.DataSource.sample` draws latents ``z ~ N(0, I)`` and, for a
conditional generator, class-balanced labels in shuffled order from the seed, and runs the generator:
the same seed gives the same images, so workers can make their own batches from a seed instead of
receiving arrays. Unlike ``fractal`` labels, a conditional generator's labels *are* the classes of the
data it was trained on, i.e. the target model's classes (usable by the ``ce`` objective).

The generator's output must fit the model: grayscale output feeds 3-channel models (repeated) and RGB
feeds 1-channel ones (luma), as for ``.npz`` files, but a different height or width is an error --
images are never silently resized.
"""

from __future__ import annotations

import numpy as np

from evoquant.data.files import _adapt_channels
from evoquant.data.registry import DataSource, register_source
from evoquant.errors import EvoquantError

__all__ = ["GanSource"]


@register_source("gan")
class GanSource(DataSource):
    """Images from a generator directory or file; labels when the generator is conditional.

    Attributes:
        generator: the loaded :class:`~evoquant.gan.generator.Generator` (``generator.info`` describes it).
    """

    finite = False
    labels_are_classes = True  # a conditional generator's labels are the classes it was trained on

    def __init__(self, spec: str, arg: str | None = None) -> None:
        super().__init__(spec, arg)
        if not arg:
            raise EvoquantError("the gan source needs a generator: gan:GEN_DIR (a directory written by 'evoquant gan train') "
                                "or gan:FILE (.xml, .onnx or TorchScript with a .json beside it)")
        from evoquant.gan.generator import load_generator

        self.generator = load_generator(arg)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the generator's images."""
        return self.generator.info.image_shape

    def _sample01(self, n, shape, rng):
        channels, height, width = shape
        have_channels, have_height, have_width = self.image_shape
        if (have_height, have_width) != (height, width) or not (have_channels == channels or {have_channels, channels} <= {1, 3}):
            raise EvoquantError(f"the generator {self.arg} makes {have_channels}x{have_height}x{have_width} images "
                                f"but the model takes {channels}x{height}x{width}")
        z, labels = self.generator.sample_inputs(n, rng)
        images = _adapt_channels(self.generator.images01(z, labels), channels)
        return np.ascontiguousarray(images, dtype=np.float32), labels
