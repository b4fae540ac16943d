"""Which layers of a W4A8 model to keep at 8-bit weights, for a budget of weights (``evoquant quantize --ratio``).

NNCF's ``compress_weights`` spells the budget ``ratio``: the share of the weights kept at 4 bits, the rest
at 8. Which layers get the 8 bits is decided here by what the reconstruction cannot recover: each layer is
fitted at 4 bits (:func:`~evoquant.reconstruct.stage.reconstruct`, quantized inputs, FP32 layer outputs),
and its error after the fit, relative to its output's mean square, is its sensitivity. Measured on a
depthwise-separable CNN, the layers whose error the fit leaves are the small ones -- the first convolution
and the depthwise 3×3 (9 weights per channel on 15 levels) -- so the budget is spent greedily by
sensitivity per weight: most error removed per weight moved to 8 bits (docs/reconstruct.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from evoquant.reconstruct.stage import LayerResult


@dataclass(frozen=True)
class PrecisionChoice:
    """The layers kept at 8 bits, why, and the share of the weights left at 4 bits."""

    layers: tuple[str, ...]
    four_bit_share: float  # of all quantized weights (parameters)
    sensitivity: dict[str, float | None] = field(default_factory=dict)  # relative error at 4 bits after the fit; None: not scored
    unscored: tuple[str, ...] = ()  # layers the reconstruction could not fit (each with its reason in the report)


def choose_eight_bit(sizes: dict[str, int], ratio: float, fixed: Sequence[str] = (), layers: Sequence[LayerResult] = ()) -> PrecisionChoice:
    """Layers to hold at 8 bits so that at least ``ratio`` of the weights stay 4-bit.

    ``sizes``: every quantized layer's weight count, in graph order. ``fixed`` layers are 8-bit whatever the
    budget (``--int8-layers``). The rest of the budget goes to the scored ``layers`` by relative error per
    weight, largest first, each taken if it still fits; a layer the fit made error-free, or could not fit,
    is never taken.
    """
    total = sum(sizes.values())
    budget = (1.0 - ratio) * total
    chosen = list(dict.fromkeys(fixed))
    used = sum(sizes[name] for name in chosen)
    sensitivity = {layer.name: layer.relative_error for layer in layers}
    ranked = sorted((name for name, value in sensitivity.items() if value and name not in chosen and name in sizes),
                    key=lambda name: sensitivity[name] / sizes[name], reverse=True)
    for name in ranked:
        if used + sizes[name] <= budget * (1 + 1e-9):
            chosen.append(name)
            used += sizes[name]
    order = {name: i for i, name in enumerate(sizes)}
    chosen.sort(key=order.__getitem__)
    unscored = tuple(layer.name for layer in layers if layer.skipped)
    return PrecisionChoice(tuple(chosen), 1.0 - used / total if total else 1.0, sensitivity, unscored)
