"""AdaRound with the output target: learned up/down rounding of the FP32 weight, per layer.

Each weight is ``s · (floor(W_fp / s + z) + h(V) − z)`` with the rectified sigmoid
``h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)`` (ζ = 1.1, γ = −0.1), ``V`` initialised so that ``h`` equals the
fractional part. Adam (lr 0.01) minimises the layer's mean squared output error against the FP32 layer's
output (bias included, the quantized model's inputs) plus ``λ Σ (1 − |2h − 1|^β)``, with β annealed from
20 to 2 after a warm-up of 20 % of the iterations without the regulariser (the paper's schedule). The loss
is evaluated exactly from the normal equations (``XᵀX``, ``TᵀX``) instead of on mini-batches, so the
gradient is ``2 (W XᵀX − TᵀX)`` with no sampling noise. States end at ``floor + [h ≥ 0.5]``, clipped
to the grid.
"""

from __future__ import annotations

import numpy as np

from evoquant.reconstruct.solver import LayerProblem

ZETA, GAMMA = 1.1, -0.1
ITERATIONS = 2000
LEARNING_RATE = 0.01
REGULARISATION = 0.01
WARM_UP = 0.2


def adaround_solver(problem: LayerProblem, *, iterations: int = ITERATIONS) -> np.ndarray:
    grid, equations = problem.grid, problem.equations
    start = np.asarray(problem.start_states, dtype=np.int32)
    if problem.reference_weight is None:
        return start
    scaled = problem.reference_weight / grid.scale + grid.zero
    base = np.clip(np.floor(scaled), grid.low, np.maximum(grid.high - 1, grid.low))
    rest = np.clip(scaled - base, 0.01, 0.99)
    v = -np.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    # Normalise the reconstruction loss by the target's power so λ means the same on every layer.
    norm = max(equations.target_square, 1e-12)
    gram, cross = equations.gram, equations.cross
    m, s = np.zeros_like(v), np.zeros_like(v)
    warm = int(WARM_UP * iterations)
    for step in range(1, iterations + 1):
        sig = 1.0 / (1.0 + np.exp(-v))
        raw = sig * (ZETA - GAMMA) + GAMMA
        h = np.clip(raw, 0.0, 1.0)
        weight = (base + h - grid.zero) * grid.scale
        grad_h = 2.0 * (weight @ gram - cross) * grid.scale / norm
        if step > warm:
            beta = 2.0 + (20.0 - 2.0) * (1.0 - (step - warm) / max(iterations - warm, 1))
            centred = 2.0 * h - 1.0
            grad_h += REGULARISATION * (-beta * np.abs(centred) ** (beta - 1.0) * np.sign(centred) * 2.0) / h.size
        grad_v = grad_h * sig * (1.0 - sig) * (ZETA - GAMMA) * ((raw > 0.0) & (raw < 1.0))
        m = 0.9 * m + 0.1 * grad_v
        s = 0.999 * s + 0.001 * grad_v**2
        v -= LEARNING_RATE * (m / (1 - 0.9**step)) / (np.sqrt(s / (1 - 0.999**step)) + 1e-8)
    sig = 1.0 / (1.0 + np.exp(-v))
    h = np.clip(sig * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)
    return np.clip(base + (h >= 0.5), grid.low, grid.high).astype(np.int32)
