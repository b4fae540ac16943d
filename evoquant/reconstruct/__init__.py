"""The layer-wise reconstruction stage: integer states that reproduce each FP32 layer's output."""

from evoquant.reconstruct.stage import LayerResult, ReconstructResult, reconstruct

__all__ = ["reconstruct", "ReconstructResult", "LayerResult"]
