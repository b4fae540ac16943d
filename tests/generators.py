"""Tiny generators built in code with ``openvino.opset13`` (no torch, no training), for data-source tests.

A *linear generator* maps ``[z, onehot(label)]`` through a seeded random matrix and ``tanh`` to images
``(N, C, H, W)`` in ``[-1, 1]``: it behaves like a real conditional generator (deterministic, different
images for different z, class-dependent) while costing nothing to build.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as opset


def linear_generator_model(shape, *, classes: int = 4, latent: int = 8, onehot: bool = False, label_first: bool = False,
                           output_scale: float = 1.0, seed: int = 0) -> ov.Model:
    """An OpenVINO generator ``(z[, label]) -> tanh(W [z, onehot(label)]) * output_scale`` shaped ``(N, *shape)``.

    ``classes == 0`` makes an unconditional one (input ``z`` only); ``onehot`` takes the label as float
    ``(N, classes)`` instead of int64 ``(N,)``; ``label_first`` puts the label input first.
    """
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    z = opset.parameter([-1, latent], np.float32, name="z")
    features = z
    parameters = [z]
    if classes:
        if onehot:
            label = opset.parameter([-1, classes], np.float32, name="label")
            code = label
        else:
            label = opset.parameter([-1], np.int64, name="label")
            code = opset.gather(opset.constant(np.eye(classes, dtype=np.float32)), label, opset.constant(np.int64(0)))
        features = opset.concat([z, code], axis=1)
        parameters = [label, z] if label_first else [z, label]
    weights = (rng.normal(size=(latent + classes, size)) / np.sqrt(latent + classes)).astype(np.float32)
    pixels = opset.tanh(opset.matmul(features, opset.constant(weights), False, False))
    if output_scale != 1.0:
        pixels = opset.multiply(pixels, opset.constant(np.float32(output_scale)))
    images = opset.reshape(pixels, opset.constant(np.array([-1, *shape], dtype=np.int64)), False)
    model = ov.Model([images], parameters, "linear_generator")
    for port, name in zip(model.inputs, [p.get_friendly_name() for p in parameters]):
        port.get_tensor().set_names({name})
    return model


def write_linear_generator(folder: Path, shape, *, classes: int = 4, latent: int = 8, **kwargs) -> Path:
    """Write a generator directory (``generator.xml/.bin`` + ``generator.json``) holding a linear generator."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ov.save_model(linear_generator_model(shape, classes=classes, latent=latent, **kwargs), folder / "generator.xml", compress_to_fp16=False)
    meta = {
        "format": "evoquant-generator",
        "version": 1,
        "latent_size": latent,
        "num_classes": classes,
        "image_shape": list(shape),
        "value_range": [-1.0, 1.0],
        "label_input": ("onehot" if kwargs.get("onehot") else "index") if classes else "none",
        "files": {"openvino": "generator.xml"},
    }
    (folder / "generator.json").write_text(json.dumps(meta))
    return folder
