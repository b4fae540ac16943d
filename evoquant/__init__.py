"""evoquant: evolutionary weight-rounding for OpenVINO INT8 models, driven by synthetic data.

Public API::

    evoquant.refine(model, reference=..., data=..., output=..., fitness=...)  -> RefineResult
    evoquant.inspect(model)                                                  -> list[WeightInfo]
    evoquant.quantize(fp32, calibration=..., output=..., subset_size=..., preset=..., ignored_scope=...)
                                                                             -> QuantizeResult
    evoquant.synthesize(source, n=..., shape=... | like=..., output=...)    -> Batch
    evoquant.gan.train_gan / distill / load_generator                        (synthetic data from GANs)
    evoquant.RefineConfig, evoquant.SearchConfig                             (frozen dataclasses, YAML presets)
    evoquant.EvoquantError                                                   (every user-facing error)
"""

from evoquant.api import Metrics, QuantizeResult, RefineResult, WeightInfo, inspect, quantize, refine, synthesize
from evoquant.config import RefineConfig, SearchConfig
from evoquant.errors import EvoquantError

__all__ = ["refine", "inspect", "quantize", "synthesize", "QuantizeResult", "RefineConfig", "SearchConfig", "RefineResult", "Metrics", "WeightInfo", "EvoquantError"]
__version__ = "0.1.0"
