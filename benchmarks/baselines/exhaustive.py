"""The exact optimum of evoquant's own layer objective where it is cheap to enumerate.

evoquant's solver picks each row's states column by column with GPTQ's error feedback: greedy, so on a
layer of a few columns it can miss the optimum of the very objective it minimises. This baseline
enumerates every assignment within the layer's grid (±1 of the start by default: ``3^K`` per output row)
for layers of at most :data:`MAX_COLUMNS` columns -- a depthwise 3×3 convolution has 9, a first layer on
one-channel images 9 -- and leaves the rest to evoquant's solver. It answers one question: is the greedy
column order what limits the reconstruction on depthwise models? (Measured: no; docs/reconstruct.md.)
"""

from __future__ import annotations

import numpy as np

from evoquant.reconstruct.solver import LayerProblem, brute_force_states, no_worse_than_start, output_target_solver

MAX_COLUMNS = 10
MAX_ASSIGNMENTS = 3**MAX_COLUMNS


def exhaustive_solver(problem: LayerProblem) -> np.ndarray:
    choices = (problem.grid.high - problem.grid.low + 1).prod(axis=1)
    if problem.anchor != "start" or problem.start_states.shape[1] > MAX_COLUMNS or float(choices.max()) > MAX_ASSIGNMENTS:
        return output_target_solver(problem)
    states = brute_force_states(problem.equations, problem.grid, problem.start_states, damping=problem.damping)
    return no_worse_than_start(problem, states)  # as evoquant's solver
