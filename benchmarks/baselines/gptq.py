"""Classic GPTQ: the FP32 weight rounded column by column with error feedback, weights-only target.

GPTQ minimises ``‖W_fp X − Q X‖²`` where ``X`` are the layer's inputs in the (partially) quantized model:
the layer's own FP32 weight is the target, so whatever bias correction NNCF applied to ``b_q`` is ignored.
That is the difference from evoquant's output target, and the reason this baseline exists.
"""

from __future__ import annotations

import numpy as np

from evoquant.reconstruct.solver import LayerProblem, solve_states


def gptq_solver(problem: LayerProblem) -> np.ndarray:
    if problem.reference_weight is None:  # the reference's weight is not a plain constant: nothing to round
        return np.asarray(problem.start_states, dtype=np.int32)
    return solve_states(problem.equations, problem.grid, problem.start_states, damping=problem.damping, act_order=problem.act_order,
                        target_weight=problem.reference_weight)
