"""evoquant: evolutionary weight-rounding for OpenVINO INT8 models, driven by synthetic data.

Public API::

    evoquant.refine(model, reference=..., data=..., output=..., stages=..., input_shape=...) -> RefineResult
    evoquant.resume(run_dir) / merge(run_dirs, output=...)                   -> RefineResult / MergeResult
    evoquant.inspect(model) / inspect_unmatched(model)                       -> weights / layers not refined
    evoquant.analyze(model, reference=..., data=...)                         -> AnalysisResult (weights vs activations, per layer)
    evoquant.quantize(fp32, calibration=..., output=..., weight_bits=4|8, target_device=..., model_type=...)
                                                                             -> QuantizeResult
    evoquant.synthesize(source, n=..., shape=... | like=..., output=...)    -> Batch
    evoquant.datafree(teacher.pt2, method=zeroq|genie|gdfq|qimera|clusterq, output=...) -> DataFreeResult
    evoquant.gan.train_gan / distill / load_generator                        (synthetic data from GANs)
    evoquant.RefineConfig, evoquant.SearchConfig                             (frozen dataclasses, YAML presets)
    evoquant.EvoquantError                                                   (every user-facing error)
"""

from evoquant.api import MergeResult, Metrics, QuantizeResult, RefineResult, StageReport, WeightInfo, inspect, inspect_unmatched, merge, quantize, refine, resume, synthesize
from evoquant.analyze import AnalysisResult, analyze
from evoquant.config import ReconstructConfig, RefineConfig, SearchConfig
from evoquant.dfq import DataFreeResult, datafree
from evoquant.errors import EvoquantError, EvoquantWarning

__all__ = ["refine", "analyze", "AnalysisResult", "resume", "merge", "datafree", "DataFreeResult", "MergeResult", "inspect", "inspect_unmatched", "quantize", "synthesize", "QuantizeResult", "RefineConfig", "SearchConfig", "ReconstructConfig",
           "RefineResult", "StageReport", "Metrics", "WeightInfo", "EvoquantError", "EvoquantWarning"]
__version__ = "0.1.0"
