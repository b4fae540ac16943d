"""Input images for calibration and fitness evaluation, behind one ``--data SPEC`` registry.

Usage::

    from evoquant.data import load_source
    source = load_source("fractal:64")            # or "noise:gaussian", "gan:GEN_DIR", "data.npz", "images/"
    batch = source.sample(512, (1, 28, 28), seed=0, value_range=(0.0, 1.0))
    batch.images  # float32 (512, 1, 28, 28);  batch.labels  # int64 (512,) or None

See :mod:`evoquant.data.registry` for the spec grammar and the :class:`DataSource` contract.
"""

from evoquant.data.registry import Batch, DataSource, list_sources, load_source, register_source, spec_path

# Importing the built-in modules registers their sources (@register_source runs at import time).
from evoquant.data import fractal as _fractal  # noqa: E402,F401
from evoquant.data import noise as _noise  # noqa: E402,F401
from evoquant.data import files as _files  # noqa: E402,F401
from evoquant.data import gan as _gan  # noqa: E402,F401

__all__ = ["Batch", "DataSource", "load_source", "register_source", "list_sources", "spec_path"]
