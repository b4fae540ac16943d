"""Reading, compiling and running OpenVINO IRs, with user-facing errors.

Everything here turns OpenVINO's multi-line C++ exceptions into one-line :class:`EvoquantError` messages,
because a user who points evoquant at a broken file should learn what is wrong, not see a stack.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
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
    if xml_path.is_dir():
        raise EvoquantError(f"{xml_path} is a directory; give the model's .xml file")
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
    from evoquant.paths import BIN_DIGEST_KEY, file_digest

    record = root.find(f"rt_info/{BIN_DIGEST_KEY}")  # an IR evoquant wrote records its .bin's digest (see evoquant.paths)
    if record is not None and bin_path.is_file() and file_digest(bin_path) != record.get("value"):
        raise EvoquantError(f"the weights file {bin_path} does not belong to {xml_path.name} (another write replaced one of the pair, "
                            "or a write is in progress)")
    try:
        return core().read_model(str(xml_path))
    except RuntimeError as error:
        message = str(error)
        if "weights" in message.lower() or "bin file" in message.lower():
            raise EvoquantError(f"the weights file {bin_path} is truncated or does not belong to {xml_path.name}") from None
        raise EvoquantError(f"OpenVINO cannot read {xml_path}: {_last_line(message)} (a damaged .bin, or a .bin from another model?)") from None


def compile_ir(model: ov.Model, *, threads: int | None = None, f32: bool = False, settings: dict | None = None) -> ov.CompiledModel:
    """Compile ``model`` for the CPU.

    ``f32=True`` forces FP32 inference (for the teacher); otherwise the plugin's defaults apply, i.e. what a
    user who deploys the written IR gets. ``threads`` limits the plugin's threads so several worker processes
    don't fight over the cores; pinning is off for the same reason. ``settings``: more of the plugin's
    properties (e.g. ``{"NUM_STREAMS": 2}``; the default is one stream, the latency setting).
    """
    config: dict[str, object] = {"ENABLE_CPU_PINNING": False}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    config.update(settings or {})
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


#: Batch sizes the plain evaluator tries (:class:`~evoquant.fitness.evaluator.PlainEvaluator`): 256 suits the
#: convolutional zoo models; the ViT runs 2,048 images 15-25 % faster in batches of 64 (its attention and MLP
#: activations stay in cache), the CNNs 2-10 % slower. Outputs do not depend on the batch size (checked
#: exactly on the families, W8A8 and W4A8).
BATCH_SIZES = (256, 64)


def input_shape(model: ov.Model, override: "tuple[int, ...] | None" = None, *, data_shape: "tuple[int, ...] | None" = None, role: str = "the model") -> tuple[int, ...]:
    """The per-sample input shape (without batch) of a single-input model, e.g. ``(1, 28, 28)``.

    A model saved with ``ov.convert_model`` defaults has a fully dynamic input (``[?,?,?,?]``); its shape
    then comes from ``override`` (the user's ``--input-shape``, batch first, as ``benchmark_app -shape``) or
    from ``data_shape`` (the per-sample shape the data fixes, e.g. an .npz). Either must fit the model's
    static dimensions; ``role`` names the model in errors ("the reference", ...).
    """
    if len(model.inputs) != 1:
        raise EvoquantError(f"evoquant supports models with one input; {role} has {len(model.inputs)}")
    shape = model.inputs[0].get_partial_shape()
    if override is not None:
        wanted = ov.PartialShape([-1, *override[1:]])
        if not wanted.compatible(shape):
            raise EvoquantError(f"--input-shape {format_shape(override)} does not fit {role}'s input shape {shape}")
        return tuple(int(d) for d in override[1:])
    if shape.rank.is_static and len(shape) >= 2 and has_static_sample_shape(model):
        return tuple(dim.get_length() for dim in shape[1:])
    if data_shape is not None and (shape.rank.is_dynamic or len(shape) == len(data_shape) + 1):
        for candidate in _channel_variants(tuple(int(d) for d in data_shape), shape):
            if ov.PartialShape([-1, *candidate]).compatible(shape):
                return candidate
    example = "1,3,224,224" if shape.rank.is_dynamic or len(shape) == 4 else ",".join(["1"] + ["N"] * (len(shape) - 1))
    raise EvoquantError(f"{role}'s input shape {shape} is dynamic: give it with --input-shape, e.g. --input-shape {example} (as benchmark_app -shape)")


def _channel_variants(data_shape: tuple[int, ...], shape: ov.PartialShape) -> list[tuple[int, ...]]:
    """``data_shape`` as it is, then -- for images, whose sources repeat a grey channel into three or
    average three into one -- with the model's own channel count (first dimension for NCHW, last for NHWC)
    where the model fixes it to 1 or 3: a grey GAN fits ``[?,3,?,?]``, as ``convert_model`` leaves a
    colour model."""
    variants = [data_shape]
    if len(data_shape) == 3 and shape.rank.is_static and len(shape) == 4:
        for axis in (0, 2):
            dim = shape[axis + 1]
            if dim.is_static and dim.get_length() in (1, 3) and data_shape[axis] in (1, 3) and data_shape[axis] != dim.get_length():
                variants.append(tuple(dim.get_length() if i == axis else d for i, d in enumerate(data_shape)))
    return variants


def parse_input_shape(text: "str | Sequence[int] | None") -> tuple[int, ...] | None:
    """``--input-shape`` as OpenVINO's tools spell it: ``1,3,224,224``, ``[1,3,224,224]`` or
    ``input[1,3,224,224]`` (a leading input name is ignored: evoquant models have one input), or a
    sequence of ints from Python. The batch dimension may be ``?`` or ``-1``; evaluation batches are
    always dynamic."""
    if text is None:
        return None
    if not isinstance(text, str):
        text = ",".join(str(dim) for dim in text)
    body = text.strip()
    if "[" in body:
        body = body[body.index("[") + 1 :]
        if not body.endswith("]"):
            raise EvoquantError(f"--input-shape {text!r}: unbalanced brackets (e.g. [1,3,224,224])")
        body = body[:-1]
    parts = [part.strip() for part in body.replace(" ", ",").split(",") if part.strip()]
    try:
        dims = tuple(-1 if part in ("?", "-1") and i == 0 else int(part) for i, part in enumerate(parts))
    except ValueError:
        raise EvoquantError(f"--input-shape must be integers batch first, e.g. 1,3,224,224 or [1,3,224,224], got {text!r}") from None
    if len(dims) < 2 or min(dims[1:]) < 1 or (dims[0] < 1 and dims[0] != -1):
        raise EvoquantError(f"--input-shape needs a batch and at least one positive dimension, e.g. 1,3,224,224, got {text!r}")
    return dims


def format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ",".join("?" if d < 0 else str(d) for d in shape) + "]"


def has_static_sample_shape(model: ov.Model) -> bool:
    """Whether every input dimension but the batch is fixed (no working copy is needed)."""
    shape = model.inputs[0].get_partial_shape()
    return shape.rank.is_static and all(dim.is_static for dim in shape[1:])


def with_sample_shape(model: ov.Model, sample_shape: "tuple[int, ...] | None" = None) -> ov.Model:
    """``model`` as evoquant runs it: its input ``[?, *sample_shape]`` -- any batch (evaluation feeds 64-256
    images at a time; ``model.reshape([1, 3, 224, 224])`` fixes it at one), and the per-sample shape the run
    uses (``None``: the model's own). ``model`` itself when it already is so; otherwise a copy.

    Sets the Parameter's partial shape and re-infers types: unlike ``model.reshape`` this runs no
    SmartReshape pass, so no flatten is rewritten to read ``ShapeOf`` of a weight. The model itself is
    untouched (the written IR keeps the user's input shape). A graph that pins the batch elsewhere (a
    Reshape to a constant ``[1, ...]``, as ``ov.convert_model(m, input=[1, ...])`` can write) cannot take
    other batches: one-line :class:`EvoquantError`.
    """
    parameter = model.get_parameters()[0]
    shape = parameter.get_partial_shape()
    wanted = ov.PartialShape([ov.Dimension(), *(sample_shape if sample_shape is not None else (shape[1:] if shape.rank.is_static else []))])
    if sample_shape is None and shape.rank.is_dynamic or shape == wanted:
        return model
    copy = model.clone()
    copy.get_parameters()[0].set_partial_shape(wanted)
    batch = shape[0] if shape.rank.is_static else ov.Dimension()
    hint = ("evoquant scores batches of images: save the model with a dynamic batch "
            "(ov.convert_model(m, example_input=x) without input=[1, ...], or model.reshape with -1 as the batch)")
    try:
        copy.validate_nodes_and_infer_types()
    except RuntimeError as error:
        if batch.is_static:
            raise EvoquantError(f"the model's input batch is fixed at {batch} and its graph takes no other ({_last_line(str(error))}); {hint}") from None
        raise EvoquantError(f"the model does not accept inputs of shape {wanted}: {_last_line(str(error))}") from None
    if batch.is_static:  # the user's batch is gone from the input: an output that keeps a fixed one pins it inside
        for output in copy.outputs:
            out_shape = output.get_partial_shape()
            if out_shape.rank.is_static and len(out_shape) >= 1 and out_shape[0].is_static:
                name = output.get_any_name() if output.get_names() else output.get_node().get_friendly_name()
                raise EvoquantError(f"the model's input batch is fixed at {batch} and its graph pins it: output {name} stays {out_shape} "
                                    f"with a dynamic input batch; {hint}")
    return copy


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
