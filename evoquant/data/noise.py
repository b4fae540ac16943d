"""The ``noise`` source: i.i.d. random pixels, the simplest data-free calibration input.

Specs:
    ``noise`` / ``noise:uniform``  -- every value uniform in the range;
    ``noise:gaussian``             -- Gaussian centred on the middle of the range with a standard
                                      deviation of a quarter of its width, clipped to the range.
"""

from __future__ import annotations

import numpy as np

from evoquant.data.registry import DataSource, register_source
from evoquant.errors import EvoquantError

__all__ = ["NoiseSource"]

# In the natural [0, 1] range: mean 0.5, sigma 0.25 keeps ~95% of the values unclipped, so the
# batch covers the whole range (like uniform noise) but concentrates mass near the middle, which is
# closer to the statistics of normalised real images.
_GAUSS_MEAN = 0.5
_GAUSS_STD = 0.25


@register_source("noise")
class NoiseSource(DataSource):
    """Procedural noise images; no labels.

    ``arg`` is ``None``/``"uniform"`` (default) or ``"gaussian"``.
    """

    finite = False
    KINDS = ("uniform", "gaussian")

    def __init__(self, spec: str, arg: str | None = None) -> None:
        super().__init__(spec, arg)
        kind = (arg or "uniform").lower()
        if kind not in self.KINDS:
            raise EvoquantError(f"unknown noise kind '{arg}' in '{spec}'; expected noise:uniform or noise:gaussian")
        self.kind = kind

    def _sample01(self, n, shape, rng):
        size = (n, *shape)
        if self.kind == "uniform":
            images = rng.random(size, dtype=np.float32)
        else:
            images = rng.standard_normal(size, dtype=np.float32)
            images *= np.float32(_GAUSS_STD)
            images += np.float32(_GAUSS_MEAN)
            np.clip(images, 0.0, 1.0, out=images)
        return images, None
