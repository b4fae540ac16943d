"""A minimal reproduction, in plain OpenVINO, of the CPU plugin computing 1x1 convolutions with decompressed
weights wrongly under several streams (docs/usage.md, "a W4A8 caveat"). One JSON line per (case, setting).

Each case is one Convolution whose weight is ``Constant(i4, u4 or i8) -> Convert(f32) -> [Subtract(zero
point)] -> Multiply(scale)`` (the form NNCF writes), optionally after a FakeQuantize on its input (256 levels:
NNCF's activation quantizer), run on random inputs and compared with the same convolution in numpy.
On OpenVINO 2026.4.1 (this machine) a 1x1 kernel comes out wrong (errors 30-50x the output's magnitude)
under ``NUM_STREAMS: 2`` and ``PERFORMANCE_HINT: THROUGHPUT`` whenever its weights are decompressed in
the graph: 4-bit weights always are (W4A8), 8-bit ones only without the FakeQuantize (with it the plugin
folds them into its int8 kernel: W8A8 is right). 3x3 kernels come out right. One stream is right.

    python benchmarks/w4_streams_repro.py
    python benchmarks/w4_streams_repro.py --repeat 3 > benchmarks/results/w4_streams_repro.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from exec_modes import SETTINGS  # the plugin settings exec_modes.py runs the zoo under (plain dicts: no evoquant code)

#: (input channels, output channels, kernel, weight type, FakeQuantize on the input)
CASES = [(64, 128, 1, "i4", False), (64, 128, 1, "u4", False), (128, 64, 1, "i4", False), (64, 128, 3, "i4", False), (64, 128, 1, "i8", False),
         (64, 128, 1, "i4", True), (64, 128, 1, "i8", True)]


def convolution(cin: int, cout: int, kernel: int, element_type: str, fake_quantize: bool, rng):
    """The one-convolution model and its float weights (what the model should compute with)."""
    import openvino as ov
    import openvino.opset13 as opset

    low, high = {"i4": (-8, 8), "u4": (0, 16), "i8": (-128, 128)}[element_type]
    states = rng.integers(low, high, (cout, cin, kernel, kernel))
    scale = (rng.random((cout, 1, 1, 1)) * 0.02 + 0.01).astype(np.float32)
    zero_point = 8.0 if element_type == "u4" else 0.0
    weight = opset.convert(opset.constant(states.astype(np.uint8 if element_type == "u4" else np.int8), dtype=getattr(ov.Type, element_type)), np.float32)
    if zero_point:
        weight = opset.subtract(weight, opset.constant(np.float32(zero_point)))
    weight = opset.multiply(weight, opset.constant(scale))
    x = opset.parameter([-1, cin, 7, 7], np.float32, name="x")
    data = x
    if fake_quantize:  # levels at multiples of 1/64 over [0, 4): the test images below sit exactly on them
        low, high = opset.constant(np.float32(0.0)), opset.constant(np.float32(255 / 64))
        data = opset.fake_quantize(x, low, high, low, high, 256)
    pad = [kernel // 2] * 2
    model = ov.Model([opset.convolution(data, weight, [1, 1], pad, pad, [1, 1])], [x])
    return model, (states - zero_point).astype(np.float32) * scale


def reference(images: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The convolution in numpy (stride 1, same padding)."""
    kernel = weights.shape[-1]
    pad = kernel // 2
    padded = np.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    height, width = images.shape[2:]
    out = np.zeros((images.shape[0], weights.shape[0], height, width), np.float64)
    for dy in range(kernel):
        for dx in range(kernel):
            out += np.einsum("oc,nchw->nohw", weights[:, :, dy, dx], padded[:, :, dy : dy + height, dx : dx + width])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=1, help="compile and run each case this many times (the failure is not deterministic)")
    args = parser.parse_args(argv)

    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    for cin, cout, kernel, element_type, fake_quantize in CASES:
        model, weights = convolution(cin, cout, kernel, element_type, fake_quantize, rng)
        images = (rng.integers(0, 256, (8, cin, 7, 7)) / 64).astype(np.float32)
        expected = reference(images, weights)
        for attempt in range(args.repeat):
            for setting, config in SETTINGS.items():
                compiled = core.compile_model(model, "CPU", {"ENABLE_CPU_PINNING": False, **config})
                out = np.asarray(compiled.create_infer_request().infer({0: images})[0], dtype=np.float64)
                error = float(np.abs(out - expected).max())
                print(json.dumps({"benchmark": "w4_streams_repro", "input_channels": cin, "output_channels": cout, "kernel": kernel, "weight_type": element_type,
                                  "fake_quantize": fake_quantize,
                                  "setting": setting, "attempt": attempt, "max_abs_error": error, "max_abs_output": float(np.abs(expected).max()),
                                  "wrong": error > 0.05 * float(np.abs(expected).max()), "openvino": ov.__version__.split("-")[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
