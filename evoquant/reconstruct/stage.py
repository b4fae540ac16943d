"""The reconstruction stage: layer by layer, integer states that reproduce the FP32 layer outputs.

For each quantized layer in graph order: its inputs come from the *current* quantized model (the layers
before it already reconstructed, as the CPU plugin computes them), its target is the FP32 reference's
output of the same layer, bias included, minus the quantized model's own bias (NNCF's bias correction has
moved that bias; the target absorbs it). The solver (:mod:`evoquant.reconstruct.solver`) picks states on
the tensor's own grid, within ±``max_shift`` of the starting states. Layers are matched to the reference
by name and checked by output shape, never by weight values (SmoothQuant rescales weights and inputs).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from evoquant.config import ReconstructConfig
from evoquant.ir.layers import ActivationTap, UnsupportedLayer, has_smooth_quant, layer_bias, layer_geometry, layer_output_shape, layer_weight
from evoquant.reconstruct.rows import input_rows, output_rows, rows_per_image, weight_from_matrices, weight_matrices
from evoquant.reconstruct.solver import Grid, LayerProblem, LayerQuadratic, NormalEquations, error_gradient, flip_residual, layer_solver


@dataclass(frozen=True)
class LayerResult:
    """One layer of the reconstruction: mean squared output error before and after, states moved."""

    name: str
    rows: int
    error_before: float | None
    error_after: float | None
    changed: int
    size: int
    skipped: str | None = None  # why the layer was left as it was
    error_bias_refit: float | None = None  # error_after if the layer's bias were re-fitted too (measured, not applied)
    # on the check images (not fitted on): mean squared error before and after, and how many output rows
    # (channels) kept their starting states because the solve made them worse there
    check_rows: int = 0
    check_before: float | None = None
    check_after: float | None = None
    rows_kept: int = 0
    target_energy: float | None = None  # mean square of the layer's target output (bias removed): the scale of its errors

    @property
    def relative_error(self) -> float | None:
        """``error_after`` as a share of the target's mean square: comparable across layers."""
        if self.error_after is None or not self.target_energy:
            return None
        return self.error_after / self.target_energy


@dataclass
class ReconstructResult:
    """States per weight-table index (only the layers that changed), and a report per layer."""

    states: dict[int, np.ndarray]
    layers: list[LayerResult] = field(default_factory=list)
    seconds: float = 0.0
    # Only with reconstruct(guides=True), for the evolve stage, per solved tensor (weight-table index):
    # how cheap each weight's one-state move is for its layer after the solve, as a pseudo rounding residual
    # in the tensor's shape (solver.flip_residual: guided moves), and its layer's error as a function of
    # state shifts (solver.LayerQuadratic: search.layer_penalty)
    flip_residuals: dict[int, np.ndarray] = field(default_factory=dict)
    quadratics: dict[int, LayerQuadratic] = field(default_factory=dict)

    @property
    def skipped(self) -> list[LayerResult]:
        return [layer for layer in self.layers if layer.skipped]

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "layers": [asdict(layer) for layer in self.layers]}


def weight_grid(weight, geometry, max_shift: int | None) -> list[Grid]:
    """Each group's :class:`Grid` for a weight-table entry, as the layer sees the weight."""
    shape = weight.shape
    scale = np.broadcast_to(np.asarray(weight.scale, dtype=np.float64), shape)
    offset = np.broadcast_to(np.asarray(weight.offset, dtype=np.float64), shape)
    if weight.form == "compressed":
        zero = offset
    else:  # value = offset + q * scale = (q - zero) * scale
        zero = -offset / np.where(scale == 0, 1.0, scale)
    low = np.full(shape, float(weight.low))
    high = np.full(shape, float(weight.high))
    if max_shift is not None:
        low = np.maximum(low, weight.states - max_shift)
        high = np.minimum(high, weight.states + max_shift)
    frozen = scale == 0  # a degenerate channel: nothing to choose
    low = np.where(frozen, weight.states, low)
    high = np.where(frozen, weight.states, high)
    safe_scale = np.where(frozen, 1.0, scale)
    parts = [weight_matrices(array, geometry) for array in (safe_scale, zero, low, high)]
    return [Grid(*group) for group in zip(*parts)]


def reconstruct(model, table, teacher, images: np.ndarray, config: ReconstructConfig, *, progress: bool = False, guides: bool = False,
                label: str = "reconstruct") -> ReconstructResult:
    """Reconstruct every quantized layer of ``model`` (a static-shape ``ov.Model``) against ``teacher``.

    ``images`` are the calibration images (already shaped and scaled for the model). The model object is
    patched while the stage runs and restored at the end; the returned states are applied by the caller.
    ``guides`` also keeps what the evolve stage's guided moves and layer penalty need (``flip_residuals``,
    ``quadratics``: a float per weight and each layer's ``XᵀX``, so only when asked). ``label`` names the
    progress bar.
    """
    from evoquant.ir.patch import ConstantPatcher

    started = time.perf_counter()
    solver = layer_solver(config.solver)
    fitted = min(config.images, len(images))
    images = np.ascontiguousarray(images[: fitted + config.check_images])
    layers: list[LayerResult] = []
    plans = []
    for weight in table:
        try:
            geometry = layer_geometry(model, weight)
            reference_shape = layer_output_shape(teacher, weight.consumer)
        except UnsupportedLayer as error:
            layers.append(LayerResult(weight.consumer, 0, None, None, 0, weight.size, skipped=str(error)))
            continue
        if reference_shape != geometry.output_shape:
            layers.append(LayerResult(weight.consumer, 0, None, None, 0, weight.size, skipped=f"the reference's layer outputs {reference_shape}, this one {geometry.output_shape}"))
            continue
        plans.append((weight, geometry))
    if not plans:
        return ReconstructResult({}, layers, time.perf_counter() - started)

    chunks = list(range(0, len(images), config.batch_size))
    positions = {weight.index: _positions(geometry, len(images), chunks, config, weight.index) for weight, geometry in plans}
    if config.inputs == "fp32" and has_smooth_quant(model):
        # the reference's own layer inputs are what the fit uses: with SmoothQuant in the graph, each layer's
        # quantized inputs are first compared with the reference's (without it the two differ by quantization
        # error only, which can be large in a few quiet layers), and a rescaled layer is left out before any
        # target is gathered (a transformer: all but a few layers)
        rescaled = _rescaled_layers(model, teacher, plans, images[: config.batch_size], positions)
        layers += [LayerResult(weight.consumer, 0, None, None, 0, weight.size, skipped="its quantized inputs are rescaled (SmoothQuant): "
                               "the reference's own layer inputs are not what it computes with") for weight, _ in plans if weight.index in rescaled]
        plans = [plan for plan in plans if plan[0].index not in rescaled]
        if not plans:
            return ReconstructResult({}, layers, time.perf_counter() - started)

    # Targets: the FP32 layer outputs (bias included) minus the quantized layer's bias, at the sampled rows.
    teacher_tap = ActivationTap(teacher, [("output", weight.consumer, 0) for weight, _ in plans], f32=True)
    biases = {weight.index: layer_bias(model, weight.consumer) for weight, _ in plans}
    targets: dict[int, list[list[np.ndarray]]] = {weight.index: [] for weight, _ in plans}
    for chunk, (start, outputs) in enumerate(teacher_tap.chunks(images, config.batch_size)):
        for (weight, geometry), output in zip(plans, outputs):
            if biases[weight.index] is not None:
                output = output - biases[weight.index]
            targets[weight.index].append(output_rows(output, geometry, positions[weight.index][chunk]))
    del teacher_tap

    patcher = None if config.inputs == "fp32" else ConstantPatcher(model, table)  # only the quantized-input path patches
    solved: dict[int, np.ndarray] = {}
    residuals: dict[int, np.ndarray] = {}
    quadratics: dict[int, LayerQuadratic] = {}
    bar = _bar(progress, len(plans), label)

    def finish(fit: "_LayerFit") -> None:
        result, states, guide = fit.solve(config, solver, guides)
        if guide is not None:
            residuals[fit.weight.index], quadratics[fit.weight.index] = guide
        layers.append(result)
        if states is not None:
            solved[fit.weight.index] = states
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{fit.weight.consumer}: error {_change(result)}")

    def fit_for(weight, geometry) -> "_LayerFit":
        reference = layer_weight(teacher, weight.consumer, weight.consumer_port)
        if reference is not None and reference.shape != tuple(geometry.weight_shape):
            reference = None
        return _LayerFit(weight, geometry, fitted, targets.pop(weight.index), positions[weight.index], config.max_shift, reference)

    try:
        if config.inputs == "fp32":
            # the reference's own layer inputs do not depend on any solve: every layer is gathered in a few
            # passes (as many layers per pass as MEMORY_PER_PASS allows), then solved
            for group in _passes(plans, config.batch_size):
                fits = [fit_for(weight, geometry) for weight, geometry in group]
                tap = ActivationTap(teacher, [fit.tap for fit in fits], f32=True)
                for chunk, (start, inputs) in enumerate(tap.chunks(images, config.batch_size)):
                    for fit, rows in zip(fits, inputs):
                        fit.add(rows, start, chunk)
                del tap
                for fit in fits:
                    finish(fit)
        else:
            # the quantized model's layer inputs, as the plugin computes them with the layers before already solved
            for weight, geometry in plans:
                fit = fit_for(weight, geometry)
                tap = ActivationTap(model, [fit.tap], f32=False)
                for chunk, (start, (rows,)) in enumerate(tap.chunks(images, config.batch_size)):
                    fit.add(rows, start, chunk)
                del tap
                finish(fit)
                if weight.index in solved:
                    patcher.apply({weight.index: solved[weight.index]})
    finally:
        if patcher is not None:
            patcher.restore()
        if bar is not None:
            bar.close()
    order = {weight.consumer: i for i, weight in enumerate(table)}
    layers.sort(key=lambda layer: order.get(layer.name, -1))
    return ReconstructResult(solved, layers, time.perf_counter() - started, residuals, quadratics)


class _LayerFit:
    """One layer's normal equations, fed chunk by chunk of its input rows, then solved.

    Rows of the first ``fitted`` images are fitted on; the rest check each output row of the solve (a row
    whose error rises there keeps its starting states)."""

    def __init__(self, weight, geometry, fitted: int, targets, positions, max_shift: int | None, reference):
        self.weight, self.geometry, self.fitted, self.targets, self.positions, self.reference = weight, geometry, fitted, targets, positions, reference
        self.grids = weight_grid(weight, geometry, max_shift)
        self.equations = [NormalEquations(grid.scale.shape[1], grid.scale.shape[0]) for grid in self.grids]
        self.checks = [NormalEquations(grid.scale.shape[1], grid.scale.shape[0]) for grid in self.grids]
        self.per_image = rows_per_image(geometry)

    @property
    def tap(self) -> tuple[str, str, int]:
        return _input_tap(self.weight, self.geometry)

    def add(self, inputs: np.ndarray, start: int, chunk: int) -> None:
        """The layer's inputs for the chunk of images that begins at image ``start``."""
        positions = self.positions[chunk]
        held = start + positions // self.per_image >= self.fitted
        for group, rows in enumerate(input_rows(inputs, self.geometry, positions)):
            target = self.targets[chunk][group]
            self.equations[group].add(rows[~held], target[~held])
            if held.any():
                self.checks[group].add(rows[held], target[held])

    def solve(self, config: ReconstructConfig, solver, guides: bool):
        """The layer's report, its new states (None when unchanged) and, with ``guides``, its (flip residual, quadratic)."""
        weight, geometry, groups = self.weight, self.geometry, self.grids
        start_matrices = weight_matrices(weight.states, geometry)
        references = weight_matrices(self.reference, geometry) if self.reference is not None else [None] * len(groups)
        new_matrices, flips, gradients, before, after, refit, energy = [], [], [], 0.0, 0.0, 0.0, 0.0
        check_before, check_after, kept = 0.0, 0.0, 0
        for grid, start, system, check, fp32 in zip(groups, start_matrices, self.equations, self.checks, references):
            states = np.clip(solver(LayerProblem(system, grid, start, fp32, config.damping, config.act_order, config.anchor)), grid.low, grid.high).astype(np.int32)
            if check.rows:
                moved = np.any(states != start, axis=1)
                worse = moved & (check.row_errors(grid.values(states)) > check.row_errors(grid.values(start)))
                states[worse] = start[worse]
                kept += int(np.count_nonzero(worse))
                check_before += check.error(grid.values(start))
                check_after += check.error(grid.values(states))
            error_before, error_after = system.error(grid.values(start)), system.error(grid.values(states))
            new_matrices.append(states)
            if guides:
                gradients.append(error_gradient(system, grid, states))
                flips.append(flip_residual(system, grid, states, gradients[-1]))
            refit += error_after - float(np.mean(np.square(system.mean_residual(grid.values(states)))))
            before += error_before
            after += error_after
            energy += system.target_square / max(system.rows * grid.scale.shape[0], 1)
        new_states = weight_from_matrices(new_matrices, geometry).reshape(weight.shape).astype(np.int32)
        changed = int(np.count_nonzero(new_states != weight.states))
        count = len(groups)
        checked = self.checks[0].rows
        result = LayerResult(weight.consumer, self.equations[0].rows, before / count, after / count, changed, weight.size, error_bias_refit=refit / count,
                             check_rows=checked, check_before=check_before / count if checked else None, check_after=check_after / count if checked else None, rows_kept=kept,
                             target_energy=energy / count)
        if not guides:
            return result, (new_states if changed else None), None
        flip = weight_from_matrices(flips, geometry).reshape(weight.shape)
        quadratic = LayerQuadratic.around(self.equations, groups, new_matrices, positions_in_groups(geometry, weight.shape), gradients)
        return result, (new_states if changed else None), (flip, quadratic)


def _input_tap(weight, geometry) -> tuple[str, str, int]:
    """The :class:`ActivationTap` spec of the layer's data input (a MatMul's other operand than the weight)."""
    return ("input", weight.consumer, 1 - weight.consumer_port if geometry.kind == "matmul" else 0)


#: How much memory the layers gathered in one pass (inputs=fp32) may take: each holds its normal equations
#: (K² + R·K float64 per group, twice: fit and check) and one batch of its inputs (float32).
MEMORY_PER_PASS = 1 << 30


def _passes(plans: list, batch_size: int = 64) -> list[list]:
    """``plans`` (graph order) cut into runs that fit in :data:`MEMORY_PER_PASS` together."""
    passes, current, used = [], [], 0
    for weight, geometry in plans:
        need = sum(16 * columns * (rows + columns) for rows, columns in (matrix.shape for matrix in weight_matrices(weight.states, geometry)))
        need += 4 * batch_size * int(np.prod(geometry.input_shape))
        if current and used + need > MEMORY_PER_PASS:
            passes.append(current)
            current, used = [], 0
        current.append((weight, geometry))
        used += need
    if current:
        passes.append(current)
    return passes


#: An input column whose RMS differs by more than this factor between the reference and the quantized model
#: is rescaled; a layer with more than RESCALED_SHARE of such columns has SmoothQuant'ed inputs (8-bit
#: activation noise moves a column's RMS by a few percent; SmoothQuant's per-channel factors by far more).
RESCALED_FACTOR = 1.25
RESCALED_SHARE = 0.25


def _rescaled_layers(quantized, teacher, plans: list, images: np.ndarray, positions: dict) -> set[int]:
    """The weight-table indices of the layers whose quantized inputs are rescaled per channel against the
    reference's own (SmoothQuant divides them and multiplies the weights): column by column on one batch."""
    taps = [_input_tap(weight, geometry) for weight, geometry in plans]
    quantized_inputs = ActivationTap(quantized, taps, f32=False).run(images)
    reference_inputs = ActivationTap(teacher, taps, f32=True).run(images)
    return {weight.index for (weight, geometry), mine, theirs in zip(plans, quantized_inputs, reference_inputs)
            if _columns_rescaled(*(input_rows(inputs, geometry, positions[weight.index][0]) for inputs in (mine, theirs)))}


def _columns_rescaled(quantized_rows: list[np.ndarray], reference_rows: list[np.ndarray]) -> bool:
    """Whether more than RESCALED_SHARE of the non-quiet input columns differ in RMS by more than RESCALED_FACTOR."""
    quantized_rms, reference_rms = (np.concatenate([np.sqrt(np.mean(np.square(rows, dtype=np.float64), axis=0)) for rows in groups])
                                    for groups in (quantized_rows, reference_rows))
    # columns far quieter than the typical one are left out: 8-bit activations can zero them (ratio 0) while
    # SmoothQuant rescales every channel
    typical = float(np.median(reference_rms))
    alive = reference_rms > 0.1 * typical
    if typical <= 0 or not alive.any():
        return False
    ratio = quantized_rms[alive] / reference_rms[alive]
    off = np.abs(np.log(np.maximum(ratio, 1e-30))) > np.log(RESCALED_FACTOR)
    return float(np.mean(off)) > RESCALED_SHARE


def positions_in_groups(geometry, shape) -> np.ndarray:
    """``[size, 3]``: each flat weight index (the tensor's own order) → (group, row, column) of its matrix."""
    flat = np.arange(int(np.prod(shape))).reshape(shape)
    position = np.empty((flat.size, 3), dtype=np.int64)
    for group, indices in enumerate(weight_matrices(flat, geometry)):
        rows, columns = np.indices(indices.shape)
        position[indices.ravel()] = np.stack([np.full(indices.size, group), rows.ravel(), columns.ravel()], axis=1)
    return position


def _positions(geometry, total: int, chunks: list[int], config: ReconstructConfig, seed: int) -> list[np.ndarray]:
    """Per chunk of images, the flat output rows the layer is fitted on (all of them, or a seeded subset
    so that a layer gets at most ``max_rows`` rows)."""
    per_image = rows_per_image(geometry)
    rng = np.random.default_rng([config.seed, seed])
    share = min(1.0, config.max_rows / max(per_image * total, 1))
    picked = []
    for start in chunks:
        count = min(config.batch_size, total - start) * per_image
        take = max(1, int(round(count * share)))
        picked.append(np.arange(count) if take >= count else np.sort(rng.choice(count, size=take, replace=False)))
    return picked


def _change(result: LayerResult) -> str:
    if not result.error_before:
        return "-"
    return f"{100 * (result.error_after - result.error_before) / result.error_before:+.0f}%"


def _bar(progress: bool, total: int, label: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="layer", leave=False)
