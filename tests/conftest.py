"""Tiny IRs built in code: an FP32 model with a branch and a skip connection, and NNCF's INT8 versions of it.

No trained model is needed: the weights are seeded random, calibration data is seeded random, and every
IR is a few kilobytes, so the whole suite runs in CI on 2 cores.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as opset
import pytest

INPUT_SHAPE = (3, 8, 8)


def tiny_fp32_model(seed: int = 0) -> ov.Model:
    """conv → relu → (depthwise conv + skip) → matmul: a chain, a group conv, a branch, a linear layer."""
    rng = np.random.default_rng(seed)
    x = opset.parameter([-1, *INPUT_SHAPE], np.float32, name="input")
    conv = opset.convolution(x, opset.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    conv.set_friendly_name("conv1")
    relu = opset.relu(conv)
    depthwise = opset.group_convolution(relu, opset.constant(rng.normal(size=(4, 1, 1, 3, 3)).astype(np.float32)), [1, 1], [1, 1], [1, 1], [1, 1])
    depthwise.set_friendly_name("depthwise")
    added = opset.add(depthwise, relu)
    flat = opset.reshape(added, opset.constant(np.array([-1, 256], dtype=np.int64)), False)
    logits = opset.matmul(flat, opset.constant(rng.normal(size=(10, 256)).astype(np.float32) * 0.2), False, True)
    logits.set_friendly_name("fc")
    return ov.Model([logits], [x], "tiny")


def calibration_batches(seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((4, *INPUT_SHAPE), dtype=np.float32) for _ in range(8)]


@dataclass(frozen=True)
class TinyIRs:
    fp32: Path
    int8: Path  # nncf.quantize default: compressed i8 weights
    fakequantize: Path  # nncf.quantize with compress_weights=False: FakeQuantize on FP weights
    data: Path  # an .npz of fitness images of the right shape


@pytest.fixture(scope="session")
def tiny_irs(tmp_path_factory) -> TinyIRs:
    import nncf

    nncf.set_log_level(logging.ERROR)
    folder = tmp_path_factory.mktemp("tiny")
    model = tiny_fp32_model()
    ov.save_model(model, folder / "fp32.xml", compress_to_fp16=False)
    dataset = nncf.Dataset(calibration_batches())
    ov.save_model(nncf.quantize(model, dataset, subset_size=32), folder / "int8.xml", compress_to_fp16=False)
    parameters = nncf.AdvancedQuantizationParameters(backend_params={"compress_weights": False})
    ov.save_model(nncf.quantize(tiny_fp32_model(), dataset, subset_size=32, advanced_parameters=parameters), folder / "fq.xml", compress_to_fp16=False)
    rng = np.random.default_rng(5)
    np.savez(folder / "data.npz", x=rng.random((400, *INPUT_SHAPE), dtype=np.float32))
    return TinyIRs(folder / "fp32.xml", folder / "int8.xml", folder / "fq.xml", folder / "data.npz")


def ops_by_name(model: ov.Model) -> dict[str, ov.Node]:
    return {op.get_friendly_name(): op for op in model.get_ordered_ops()}
