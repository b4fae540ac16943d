"""A layer as a matrix product: weights as ``[R, K]`` matrices (one per group), activations as rows.

Convolution inputs are unfolded (im2col) at chosen output positions, with the layer's strides, pads and
dilations; a grouped or depthwise convolution is one independent problem per group. A MatMul's rows are
its input vectors, whichever operand holds the weight. Every function is the inverse-consistent partner of
another: ``weight_matrices`` / ``weight_from_matrices``, ``input_rows`` / ``output_rows`` pick the same
rows, so ``output = W @ input`` row for row (tested against OpenVINO's own layers).
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from evoquant.ir.layers import LayerGeometry


def rows_per_image(geometry: LayerGeometry) -> int:
    """How many output rows one image gives (output positions of a convolution, tokens of a MatMul)."""
    if geometry.kind == "conv":
        return int(np.prod(geometry.output_shape[1:]))
    return int(np.prod(geometry.output_shape)) // geometry.matmul_matrix_shape[0]


def weight_matrices(array: np.ndarray, geometry: LayerGeometry) -> list[np.ndarray]:
    """``array`` shaped like the layer's weight → one ``[R, K]`` matrix per group."""
    array = np.asarray(array).reshape(geometry.weight_shape)
    if geometry.kind == "conv":
        if geometry.groups > 1:
            return [array[g].reshape(array.shape[1], -1) for g in range(geometry.groups)]
        return [array.reshape(array.shape[0], -1)]
    matrix = array if _matmul_weight_is_output_major(geometry) else array.T
    return [matrix]


def weight_from_matrices(matrices: list[np.ndarray], geometry: LayerGeometry) -> np.ndarray:
    """Inverse of :func:`weight_matrices`."""
    if geometry.kind == "conv":
        if geometry.groups > 1:
            return np.stack(matrices).reshape(geometry.weight_shape)
        return matrices[0].reshape(geometry.weight_shape)
    matrix = matrices[0]
    return matrix if _matmul_weight_is_output_major(geometry) else matrix.T


def _matmul_weight_is_output_major(geometry: LayerGeometry) -> bool:
    return (geometry.weight_port == 1 and geometry.transpose_b) or (geometry.weight_port == 0 and not geometry.transpose_a)


def output_rows(output: np.ndarray, geometry: LayerGeometry, positions: np.ndarray) -> list[np.ndarray]:
    """The layer's output ``(n, *output_shape)`` at flat ``positions`` → per group ``[P, R]``."""
    if geometry.kind == "conv":
        channels = output.shape[1]
        rows = np.moveaxis(output, 1, -1).reshape(-1, channels)[positions]
        if geometry.groups > 1:
            return list(rows.reshape(len(positions), geometry.groups, -1).transpose(1, 0, 2))
        return [rows]
    if geometry.weight_port == 0:
        output = np.swapaxes(output, -1, -2)
    return [output.reshape(-1, output.shape[-1])[positions]]


def input_rows(inputs: np.ndarray, geometry: LayerGeometry, positions: np.ndarray) -> list[np.ndarray]:
    """The layer's input ``(n, *input_shape)`` → per group ``[P, K]``, the rows that produce
    :func:`output_rows` at the same ``positions``."""
    if geometry.kind == "matmul":
        if geometry.weight_port == 1:
            rows = np.swapaxes(inputs, -1, -2) if geometry.transpose_a else inputs
        else:
            rows = inputs if geometry.transpose_b else np.swapaxes(inputs, -1, -2)
        return [rows.reshape(-1, rows.shape[-1])[positions]]
    spatial = len(geometry.strides)
    kernel = geometry.weight_shape[-spatial:]
    padded = np.pad(inputs, [(0, 0), (0, 0)] + list(zip(geometry.pads_begin, geometry.pads_end)))
    spans = tuple((k - 1) * d + 1 for k, d in zip(kernel, geometry.dilations))
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + spatial)))
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in geometry.strides) + tuple(slice(None, None, d) for d in geometry.dilations)]
    out_spatial = windows.shape[2 : 2 + spatial]
    if tuple(out_spatial) != tuple(geometry.output_shape[1:]):
        raise ValueError(f"unfolding {geometry.name} gives {out_spatial}, the layer outputs {geometry.output_shape[1:]}")
    index = np.unravel_index(positions, (inputs.shape[0], *out_spatial))
    rows = windows[(index[0], slice(None)) + tuple(index[1:])]  # [P, C, *kernel]
    if geometry.groups > 1:
        rows = rows.reshape(len(positions), geometry.groups, -1)
        return [np.ascontiguousarray(rows[:, g]) for g in range(geometry.groups)]
    return [rows.reshape(len(positions), -1)]
