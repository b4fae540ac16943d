"""The layer-wise solver, in numpy: integer states that make a layer reproduce a target output.

A quantized layer computes ``y = W x + b_q`` with ``W = (Q - z) * s`` on its own grid (per-element scale
``s`` and zero point ``z``, integer states ``Q`` in ``[lo, hi]``). Given rows ``X`` (its inputs as the
quantized model feeds them) and targets ``T`` (the FP32 layer's output, bias included, minus ``b_q``), the
solver minimises

    ‖Q X − T‖² + λ ‖W − W₀‖²        (W₀: the starting dequantized weight, or the FP32 weight: ``anchor``)

over integer ``Q``. With ``H = XᵀX + λI`` the objective equals ``(W − W*) H (W − W*)ᵀ`` plus a constant,
where ``W* = (TᵀX + λW₀) H⁻¹`` is the continuous optimum; the integer states are then chosen column by
column with the OBQ/GPTQ error feedback on ``H`` (each column's rounding error is pushed onto the columns
not yet quantized, through the Cholesky factor of ``H⁻¹``). Damping toward ``W₀`` rather than toward zero
keeps a layer near its starting weights where the data does not pin it down.

Everything here is plain arrays: the OpenVINO side (which rows, which targets) lives in
:mod:`evoquant.ir.layers`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """The integer grid of one weight matrix (rows = outputs, columns = inputs), every array ``[R, K]``.

    ``value(Q) = (Q - zero) * scale``; ``low``/``high`` bound each state (the quantizer's range, narrowed
    to ±k around the starting states when asked).
    """

    scale: np.ndarray
    zero: np.ndarray
    low: np.ndarray
    high: np.ndarray

    def values(self, states: np.ndarray) -> np.ndarray:
        return (states - self.zero) * self.scale

    def nearest(self, weight: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(weight / self.scale + self.zero), self.low, self.high)


class NormalEquations:
    """Accumulates ``XᵀX``, ``TᵀX``, ``ΣX``, ``ΣT`` and ``ΣT²`` over chunks of rows, in float64.

    Memory is ``K² + R·K`` numbers whatever the number of rows, so a layer is fed chunk by chunk.
    """

    def __init__(self, inputs: int, outputs: int):
        self.gram = np.zeros((inputs, inputs))
        self.cross = np.zeros((outputs, inputs))
        self.input_sum = np.zeros(inputs)
        self.target_sum = np.zeros(outputs)
        self.target_square = 0.0
        self.rows = 0

    def add(self, rows: np.ndarray, targets: np.ndarray) -> None:
        """``rows``: ``[M, K]`` inputs; ``targets``: ``[M, R]`` wanted outputs (bias removed)."""
        rows = np.asarray(rows, dtype=np.float32)
        targets = np.asarray(targets, dtype=np.float32)
        self.gram += (rows.T @ rows).astype(np.float64)
        self.cross += (targets.T @ rows).astype(np.float64)
        self.input_sum += rows.sum(axis=0, dtype=np.float64)
        self.target_sum += targets.sum(axis=0, dtype=np.float64)
        self.target_square += float(np.square(targets, dtype=np.float64).sum())
        self.rows += len(rows)

    def mean_residual(self, weight: np.ndarray) -> np.ndarray:
        """Per output, the mean of ``T − W X`` over the rows: the bias shift that would cancel it."""
        return (self.target_sum - weight @ self.input_sum) / max(self.rows, 1)

    def row_errors(self, weight: np.ndarray) -> np.ndarray:
        """Per output row, ``‖w_r X − t_r‖²`` up to the row's own constant ``‖t_r‖²``: compares weights row by row."""
        weight = np.asarray(weight, dtype=np.float64)
        return np.einsum("rk,rk->r", weight @ self.gram - 2 * self.cross, weight)  # one matmul: a three-operand einsum loops in O(R K²) unblocked

    def error(self, weight: np.ndarray) -> float:
        """Mean squared output error ``‖W X − T‖² / (M R)`` of a weight matrix, from the sums alone."""
        value = float(self.row_errors(weight).sum()) + self.target_square
        return float(max(value, 0.0) / max(self.rows * weight.shape[0], 1))


def solve_states(
    equations: NormalEquations,
    grid: Grid,
    start_states: np.ndarray,
    *,
    damping: float = 0.01,
    act_order: bool = True,
    block: int = 128,
    target_weight: np.ndarray | None = None,
    anchor: np.ndarray | None = None,
) -> np.ndarray:
    """Integer states ``[R, K]`` minimising the damped output error (see the module docstring).

    ``damping`` is λ relative to the mean diagonal of ``XᵀX``; ``act_order`` quantizes the columns with the
    largest input energy first (GPTQ's order), which leaves the low-energy ones to absorb the errors.
    ``target_weight`` replaces the continuous optimum ``W*`` as the weight to round (classic GPTQ rounds the
    FP32 weight itself); the error feedback still runs on the damped ``H``. ``anchor`` is the weight the
    damping pulls toward (``W₀``; default the starting weight).
    """
    start_states = np.asarray(start_states, dtype=np.float64)
    anchor_weight = grid.values(start_states) if anchor is None else np.asarray(anchor, dtype=np.float64)
    gram = equations.gram
    diagonal = np.diag(gram)
    lam = damping * float(diagonal.mean()) if diagonal.size and diagonal.mean() > 0 else 1.0
    lam = max(lam, 1e-12)
    hessian = gram + lam * np.eye(len(gram))
    if target_weight is None:
        target_weight = np.linalg.solve(hessian, (equations.cross + lam * anchor_weight).T).T
    target_weight = np.array(target_weight, dtype=np.float64)

    order = np.argsort(-diagonal, kind="stable") if act_order else np.arange(len(gram))
    hessian = hessian[np.ix_(order, order)]
    weight = target_weight[:, order]
    scale, zero, low, high = (array[:, order] for array in (grid.scale, grid.zero, grid.low, grid.high))
    inverse_factor = _upper_cholesky_of_inverse(hessian)

    columns = weight.shape[1]
    states = np.empty_like(weight)
    for begin in range(0, columns, block):
        end = min(begin + block, columns)
        part = weight[:, begin:end].copy()
        errors = np.zeros_like(part)
        factor = inverse_factor[begin:end, begin:end]
        for i in range(end - begin):
            column = part[:, i]
            q = np.clip(np.rint(column / scale[:, begin + i] + zero[:, begin + i]), low[:, begin + i], high[:, begin + i])
            states[:, begin + i] = q
            error = (column - (q - zero[:, begin + i]) * scale[:, begin + i]) / factor[i, i]
            part[:, i:] -= np.outer(error, factor[i, i:])
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse_factor[begin:end, end:]
    result = np.empty_like(states)
    result[:, order] = states
    return result.astype(np.int32)


def flip_residual(equations: NormalEquations, grid: Grid, states: np.ndarray, gradient: np.ndarray | None = None) -> np.ndarray:
    """Per weight, how cheap a one-state move is for the layer's output error, as a pseudo rounding residual.

    Moving ``w[r, k]`` by ``d·s`` changes ``‖W X − T‖²`` by ``2 d s g[r, k] + s² H[k, k]`` with
    ``g = W XᵀX − TᵀX`` (:func:`error_gradient`; pass it when already computed): its cheap direction is
    ``d = −sign(g)`` and its cost ``s² H[k, k] − 2 s |g|``. The result is
    ``d · 0.5 / (1 + max(cost, 0) / typical)``, in ``[-0.5, 0.5]`` (``typical``: the median ``s² H[k, k]``),
    so the tie mutation, which moves the weights with the largest ``|residual|`` in its sign's direction,
    proposes the moves the layer notices least (an OBS-style ranking). Moves off the grid get 0.
    """
    states = np.asarray(states, dtype=np.float64)
    if gradient is None:
        gradient = error_gradient(equations, grid, states)
    curvature = np.square(grid.scale) * np.diag(equations.gram)[None, :]
    cost = curvature - 2.0 * grid.scale * np.abs(gradient)
    typical = float(np.median(curvature)) or 1.0
    direction = np.where(gradient > 0, -1.0, 1.0)
    blocked = ((direction > 0) & (states >= grid.high)) | ((direction < 0) & (states <= grid.low))
    return np.where(blocked, 0.0, direction * 0.5 / (1.0 + np.maximum(cost, 0.0) / typical))


def error_gradient(equations: NormalEquations, grid: Grid, states: np.ndarray) -> np.ndarray:
    """``g = W XᵀX − TᵀX`` at ``states``: half the gradient of ``‖W X − T‖²`` in ``W``."""
    return grid.values(np.asarray(states, dtype=np.float64)) @ equations.gram - equations.cross


@dataclass(frozen=True)
class LayerQuadratic:
    """How one layer's output error ``‖W X − T‖²`` changes with state shifts from the solved states, exactly,
    from the normal equations: ``ΔE = Σ_rows 2 Δw·g + Δw H Δwᵀ`` with ``g = W XᵀX − TᵀX``. The evolve stage
    can add it to the end-to-end loss (``search.layer_penalty``) so that moves must keep layers as good as the
    reconstruction left them."""

    grams: tuple[np.ndarray, ...]  # per group [K, K]
    gradients: tuple[np.ndarray, ...]  # per group [R, K]
    scales: tuple[np.ndarray, ...]  # per group [R, K]
    position: np.ndarray  # [size, 3]: flat weight index (the tensor's own order) → (group, row, column)
    error: float  # ‖W X − T‖² summed over groups at the solved states

    @classmethod
    def around(cls, equations: list[NormalEquations], grids: list[Grid], states: list[np.ndarray], position: np.ndarray,
               gradients: list[np.ndarray] | None = None) -> "LayerQuadratic":
        """The quadratic of a layer's groups around their ``states`` (``gradients``: when already computed)."""
        if gradients is None:
            gradients = [error_gradient(system, grid, matrix) for system, grid, matrix in zip(equations, grids, states)]
        error = sum(system.error(grid.values(matrix)) * system.rows * matrix.shape[0] for system, grid, matrix in zip(equations, grids, states))
        return cls(tuple(system.gram for system in equations), tuple(gradients), tuple(grid.scale for grid in grids), position, float(error))

    def relative_increase(self, indices: np.ndarray, deltas: np.ndarray) -> float:
        """``ΔE / E`` for moving the weights at flat ``indices`` by ``deltas`` states."""
        where = self.position[np.asarray(indices, dtype=np.int64)]
        change = 0.0
        for key in np.unique(where[:, :2], axis=0):
            group, row = int(key[0]), int(key[1])
            chosen = (where[:, 0] == group) & (where[:, 1] == row)
            columns = where[chosen, 2]
            step = np.asarray(deltas, dtype=np.float64)[chosen] * self.scales[group][row, columns]
            change += 2.0 * float(step @ self.gradients[group][row, columns]) + float(step @ self.grams[group][np.ix_(columns, columns)] @ step)
        return change / max(self.error, 1e-30)


@dataclass(frozen=True)
class LayerProblem:
    """What a layer-wise solver is given for one weight matrix (one group of a grouped convolution)."""

    equations: NormalEquations  # the layer's inputs and targets, as sums
    grid: Grid  # the tensor's own grid, bounded to ±max_shift of the start when asked
    start_states: np.ndarray  # [R, K] the states the stage starts from
    reference_weight: np.ndarray | None  # [R, K] the FP32 layer's weight, when the reference holds it as a constant
    damping: float
    act_order: bool
    anchor: str = "start"  # what the damping pulls toward: "start" or "fp32" (the reference weight, where it is the start's own)


def output_target_solver(problem: LayerProblem) -> np.ndarray:
    """evoquant's solver: the FP32 layer's output as the target (see the module docstring); a layer is
    never made worse on its own data (damping can pull the solve elsewhere: then the start is kept)."""
    start = np.asarray(problem.start_states, dtype=np.int32)
    anchor = problem.reference_weight if problem.anchor == "fp32" and quantizes_to(problem.reference_weight, problem.grid, start) else None
    return no_worse_than_start(problem, solve_states(problem.equations, problem.grid, start, damping=problem.damping, act_order=problem.act_order, anchor=anchor))


def no_worse_than_start(problem: LayerProblem, states: np.ndarray) -> np.ndarray:
    """``states``, or the start's where they leave a higher (undamped) output error on the layer's own data."""
    start = np.asarray(problem.start_states, dtype=np.int32)
    if problem.equations.error(problem.grid.values(states)) > problem.equations.error(problem.grid.values(start)):
        return start
    return states


#: The FP32 weight counts as the start's own only when it lies within one state of the starting states
#: everywhere but this share of elements: SmoothQuant rescales a layer's weight columns, and its FP32
#: weight is then another matrix that the damping must not pull toward.
ANCHOR_MISMATCH = 0.01


def quantizes_to(reference: np.ndarray | None, grid: Grid, start: np.ndarray) -> bool:
    """Whether ``start`` is ``reference`` on ``grid`` up to a state (see :data:`ANCHOR_MISMATCH`)."""
    if reference is None:
        return False
    off = np.abs(reference / grid.scale + grid.zero - start) > 1.0
    return float(np.mean(off)) <= ANCHOR_MISMATCH


SOLVERS: dict = {"output": output_target_solver}


def register_solver(name: str, solver) -> None:
    """Make ``solver`` (a function ``LayerProblem -> [R, K] int states``) available as
    ``ReconstructConfig(solver=name)`` / ``reconstruct: {solver: name}``. The benchmarks register the classic
    baselines (``benchmarks/baselines/``) this way."""
    SOLVERS[name] = solver


def layer_solver(name: str):
    """The registered solver ``name``; a one-line error naming the known ones otherwise."""
    from evoquant.errors import EvoquantError

    if name not in SOLVERS:
        raise EvoquantError(f"reconstruct: unknown solver {name!r}; known: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def _upper_cholesky_of_inverse(hessian: np.ndarray) -> np.ndarray:
    """``U`` with ``H⁻¹ = Uᵀ U``, upper triangular (GPTQ's factor); more damping if ``H`` is near singular."""
    extra = 0.0
    for _ in range(8):
        try:
            inverse = np.linalg.inv(hessian + extra * np.eye(len(hessian)))
            return np.linalg.cholesky(inverse).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-8 * float(np.abs(np.diag(hessian)).mean() or 1.0))
    raise np.linalg.LinAlgError("the input Hessian is singular even after extra damping")


def brute_force_states(equations: NormalEquations, grid: Grid, start_states: np.ndarray, *, damping: float = 0.0) -> np.ndarray:
    """The exact optimum of the damped objective over every integer assignment in the grid, row by row (the
    objective separates over output rows). Exponential in the columns: tests, and the ``exhaustive``
    benchmark baseline on layers of a few columns (a depthwise 3×3 convolution: 3⁹ assignments within ±1)."""
    rows, columns = start_states.shape
    start_weight = grid.values(np.asarray(start_states, dtype=np.float64))
    lam = damping * float(np.diag(equations.gram).mean())
    hessian = equations.gram + lam * np.eye(columns)
    linear = equations.cross + lam * start_weight  # the damping's pull toward the start, expanded
    best = np.empty((rows, columns))
    for r in range(rows):
        choices = [np.arange(int(grid.low[r, k]), int(grid.high[r, k]) + 1, dtype=np.float64) for k in range(columns)]
        states = np.stack(np.meshgrid(*choices, indexing="ij"), axis=-1).reshape(-1, columns)
        weights = (states - grid.zero[r]) * grid.scale[r]
        values = np.einsum("nk,nk->n", weights @ hessian, weights) - 2 * weights @ linear[r]
        best[r] = states[int(np.argmin(values))]
    return best.astype(np.int32)
