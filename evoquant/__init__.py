"""evoquant: evolutionary weight-rounding for OpenVINO INT8 models, driven by synthetic data.

Public API::

    evoquant.refine(model, reference=..., data=..., output=..., fitness=...)  -> RefineResult
    evoquant.inspect(model)                                                  -> list[WeightInfo]
    evoquant.RefineConfig, evoquant.SearchConfig                             (frozen dataclasses, YAML presets)
    evoquant.EvoquantError                                                   (every user-facing error)
"""

from evoquant.api import Metrics, RefineResult, WeightInfo, inspect, refine
from evoquant.config import RefineConfig, SearchConfig
from evoquant.errors import EvoquantError

__all__ = ["refine", "inspect", "RefineConfig", "SearchConfig", "RefineResult", "Metrics", "WeightInfo", "EvoquantError"]
__version__ = "0.1.0"
