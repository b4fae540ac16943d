"""The benchmark baselines (benchmarks/baselines/): classic GPTQ and AdaRound as reconstruct solvers."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from baselines.adaround import adaround_solver  # noqa: E402
from baselines.exhaustive import exhaustive_solver  # noqa: E402
from baselines.gptq import gptq_solver  # noqa: E402
from evoquant.reconstruct.solver import Grid, LayerProblem, NormalEquations, output_target_solver, solve_states  # noqa: E402


def _layer(seed: int, bias_shift: float = 0.0):
    """A layer whose FP32 weights are known, its targets the FP32 output plus a per-output shift (what
    NNCF's bias correction leaves for the output target to absorb)."""
    rng = np.random.default_rng(seed)
    rows, columns = 6, 24
    fp32 = rng.normal(0, 0.1, (rows, columns))
    scale = np.abs(fp32).max(axis=1, keepdims=True) / 7 * np.ones((1, columns))
    x = np.maximum(rng.normal(size=(2000, columns)), 0) * rng.uniform(0.2, 2.0, columns)
    equations = NormalEquations(columns, rows)
    equations.add(x, x @ fp32.T + bias_shift * rng.normal(size=rows))
    grid = Grid(scale, np.zeros_like(scale), np.full_like(scale, -7), np.full_like(scale, 7))
    return LayerProblem(equations, grid, grid.nearest(fp32), fp32, 0.01, True), fp32


def test_gptq_beats_nearest_on_the_weights_only_target_and_needs_the_fp32_weight():
    problem, fp32 = _layer(0)
    states = gptq_solver(problem)
    assert problem.equations.error(problem.grid.values(states)) < problem.equations.error(problem.grid.values(problem.start_states))
    without = LayerProblem(problem.equations, problem.grid, problem.start_states, None, 0.01, True)
    np.testing.assert_array_equal(gptq_solver(without), problem.start_states)  # nothing to round: the start


def test_adaround_rounds_each_weight_to_its_floor_or_ceil_and_lowers_the_error():
    problem, fp32 = _layer(1)
    states = adaround_solver(problem, iterations=400)
    exact = fp32 / problem.grid.scale
    assert np.all((states == np.floor(exact)) | (states == np.ceil(exact)))
    assert problem.equations.error(problem.grid.values(states)) < problem.equations.error(problem.grid.values(problem.start_states))


def test_a_shifted_target_defeats_the_weights_only_target_but_not_the_output_target():
    """Why the weights-only baseline loses on NNCF models: a target the FP32 weight no longer fits."""
    problem, _ = _layer(2, bias_shift=0.05)
    error = lambda states: problem.equations.error(problem.grid.values(states))  # noqa: E731
    assert error(output_target_solver(problem)) < error(gptq_solver(problem))


def test_exhaustive_finds_the_optimum_that_the_greedy_solve_can_miss_and_leaves_wide_layers_to_it():
    """A depthwise-like layer (9 columns, ±1): every assignment is tried, so its damped objective is never
    above the column-wise solve's; on a layer wider than 10 columns it is evoquant's solver."""
    def damped(problem, states):
        w, w0 = problem.grid.values(states), problem.grid.values(problem.start_states)
        lam = problem.damping * float(np.diag(problem.equations.gram).mean())
        return float(np.einsum("rk,rk->", w @ problem.equations.gram - 2 * problem.equations.cross, w) + lam * np.sum((w - w0) ** 2))

    strictly = 0
    for seed in range(8):
        rng = np.random.default_rng(seed)
        rows, columns = 3, 9
        fp32 = rng.normal(0, 0.1, (rows, columns))
        scale = np.full((rows, columns), 0.03)
        x = rng.normal(size=(300, columns)) @ rng.normal(size=(columns, columns))  # correlated inputs: greedy is not exact
        equations = NormalEquations(columns, rows)
        equations.add(x, x @ fp32.T)
        start = np.clip(np.rint(fp32 / scale), -7, 7)
        grid = Grid(scale, np.zeros_like(scale), np.maximum(start - 1, -7), np.minimum(start + 1, 7))
        problem = LayerProblem(equations, grid, start, fp32, 0.01, True)
        best, greedy = exhaustive_solver(problem), solve_states(equations, grid, start, damping=0.01)
        assert np.all((best >= grid.low) & (best <= grid.high))
        assert damped(problem, best) <= damped(problem, greedy) + 1e-9
        strictly += damped(problem, best) < damped(problem, greedy) - 1e-9
    assert strictly >= 1  # the greedy order does miss the optimum on some of these layers

    wide, _ = _layer(3)  # 24 columns
    np.testing.assert_array_equal(exhaustive_solver(wide), output_target_solver(wide))
