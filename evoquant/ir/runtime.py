"""Reading, compiling and running OpenVINO IRs, with user-facing errors.

Everything here turns OpenVINO's multi-line C++ exceptions into one-line :class:`EvoquantError` messages,
because a user who points evoquant at a broken file should learn what is wrong, not see a stack.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from functools import lru_cache
from pathlib import Path

import numpy as np
import openvino as ov

from evoquant.errors import EvoquantError

#: Compile config for the FP32 teacher: this CPU defaults to bf16, which would make the "reference" itself
#: approximate (see shared/CONTEXT.md).
F32_PRECISION = {"INFERENCE_PRECISION_HINT": "f32"}


@lru_cache(maxsize=1)
def core() -> ov.Core:
    """One ``ov.Core`` per process (cores are not picklable; workers build their own)."""
    return ov.Core()


def cpu_count() -> int:
    """Cores this process may use (respects affinity masks, unlike ``os.cpu_count``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def read_ir(xml_path: str | os.PathLike) -> ov.Model:
    """Read an OpenVINO IR (``.xml`` + ``.bin`` beside it) or raise a one-line :class:`EvoquantError`.

    Checks what OpenVINO would report only as a C++ trace: missing files, an .xml that is not XML, a
    missing, empty or truncated .bin.
    """
    xml_path = Path(xml_path)
    if not xml_path.is_file():
        raise EvoquantError(f"no such model file: {xml_path}")
    if xml_path.suffix.lower() != ".xml":
        raise EvoquantError(f"{xml_path} is not an OpenVINO IR (.xml expected)")
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError as error:
        raise EvoquantError(f"{xml_path} is not a valid IR: malformed XML ({error})") from None
    if root.tag != "net":
        raise EvoquantError(f"{xml_path} is not an OpenVINO IR: its root element is <{root.tag}>, not <net>")
    bin_path = xml_path.with_suffix(".bin")
    needs_weights = any(layer.get("type") == "Const" for layer in root.iter("layer"))
    if needs_weights and not bin_path.is_file():
        raise EvoquantError(f"the weights file {bin_path} is missing (an IR is an .xml and a .bin)")
    try:
        return core().read_model(str(xml_path))
    except RuntimeError as error:
        message = str(error)
        if "weights" in message.lower() or "bin file" in message.lower():
            raise EvoquantError(f"the weights file {bin_path} is truncated or does not belong to {xml_path.name}") from None
        raise EvoquantError(f"OpenVINO cannot read {xml_path}: {_last_line(message)}") from None


def compile_ir(model: ov.Model, *, threads: int | None = None, f32: bool = False) -> ov.CompiledModel:
    """Compile ``model`` for the CPU.

    ``f32=True`` forces FP32 inference (for the teacher); otherwise the plugin's defaults apply, i.e. what a
    user who deploys the written IR gets. ``threads`` limits the plugin's threads so several worker processes
    don't fight over the cores; pinning is off for the same reason.
    """
    config: dict[str, object] = {"ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if f32:
        config.update(F32_PRECISION)
    try:
        return core().compile_model(model, "CPU", config)
    except RuntimeError as error:
        raise EvoquantError(f"OpenVINO cannot compile the model: {_last_line(str(error))}") from None


def infer(compiled: ov.CompiledModel, images: np.ndarray, *, batch_size: int = 256) -> list[np.ndarray]:
    """Run ``images`` (N, ...) through a single-input model; returns one float32 array per output, batch first."""
    request = compiled.create_infer_request()
    chunks: list[list[np.ndarray]] = []
    for start in range(0, len(images), batch_size):
        result = request.infer({0: images[start : start + batch_size]})
        chunks.append([np.array(result[output], dtype=np.float32) for output in compiled.outputs])
    return [np.concatenate([chunk[i] for chunk in chunks]) for i in range(len(compiled.outputs))]


def input_shape(model: ov.Model) -> tuple[int, ...]:
    """The per-sample input shape (without batch) of a single-input model, e.g. ``(1, 28, 28)``."""
    if len(model.inputs) != 1:
        raise EvoquantError(f"evoquant supports models with one input; this one has {len(model.inputs)}")
    shape = model.inputs[0].get_partial_shape()
    if shape.rank.is_dynamic or len(shape) < 2:
        raise EvoquantError(f"the model's input shape {shape} has no fixed per-sample dimensions")
    dims = shape[1:]
    if any(dim.is_dynamic for dim in dims):
        raise EvoquantError(f"the model's input shape {shape} is dynamic beyond the batch dimension")
    return tuple(dim.get_length() for dim in dims)


def static_batch(model: ov.Model) -> int | None:
    """The input's fixed batch size, or ``None`` when it is dynamic."""
    dim = model.inputs[0].get_partial_shape()[0]
    return None if dim.is_dynamic else dim.get_length()


def output_signature(model: ov.Model) -> list[tuple[str, ...]]:
    """Per output, its per-sample shape as strings (dynamic dims as '?'): used to check teacher vs student."""
    signature = []
    for output in model.outputs:
        shape = output.get_partial_shape()
        dims = [str(d.get_length()) if d.is_static else "?" for d in shape] if shape.rank.is_static else ["*"]
        signature.append(tuple(dims[1:]))
    return signature


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip() and not line.strip().startswith("Exception from")]
    return lines[-1] if lines else message.strip()
