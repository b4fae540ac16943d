"""Portable generators: the on-disk format evoquant writes, and loading any generator to make images.

A *generator directory* (what ``evoquant gan train`` / ``gan distill`` write) holds::

    generator.json      metadata (below); written last, so a directory is a generator once it exists
    generator.xml/.bin  the generator as an OpenVINO IR (runs without torch)
    generator.pt        the same generator as TorchScript
    samples.png         a grid of samples, one row per class, for a person to look at
    checkpoint.pt       training state for --resume (not needed to generate)

``generator.json``::

    {"format": "evoquant-generator", "version": 1, "latent_size": 64, "num_classes": 10,
     "image_shape": [1, 28, 28], "value_range": [-1.0, 1.0], "label_input": "index",
     "files": {"openvino": "generator.xml", "torchscript": "generator.pt"}, ...}

:func:`load_generator` also takes an external generator file -- TorchScript (``.pt``, ``.pth``,
``.ts``), ONNX (``.onnx``, read by OpenVINO's ONNX front end, no onnx package needed) or an OpenVINO
IR (``.xml``) -- whose inputs are ``(z)`` or ``(z, label)``: ``z`` float ``(N, latent)``, ``label``
either int ``(N,)`` class indices or float ``(N, K)`` one-hot. What the file cannot say (TorchScript
input sizes, the number of classes behind an index input, the output range) comes from a JSON of the
same layout beside it (``teacher.onnx`` + ``teacher.json``) or from keyword arguments.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from evoquant.errors import EvoquantError

__all__ = ["GeneratorInfo", "Generator", "load_generator", "META_FILE", "write_json_atomically"]

META_FILE = "generator.json"
META_FORMAT = "evoquant-generator"
META_VERSION = 1
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".jit")
LABEL_INPUTS = ("index", "onehot", "none")
# GAN generators end in tanh by convention; a generator that does not is declared by its metadata.
DEFAULT_VALUE_RANGE = (-1.0, 1.0)
_INFER_BATCH = 256
# Probe outputs may overshoot the declared range a little (no tanh, float noise); more than this share
# of the range beyond it means the declared range is wrong, e.g. 0..255 pixels read as -1..1.
_RANGE_SLACK = 0.25


@dataclass(frozen=True)
class GeneratorInfo:
    """What a loaded generator takes and makes.

    Attributes:
        latent_size: length of ``z``.
        num_classes: number of classes behind the label input; 0 for an unconditional generator.
        image_shape: ``(C, H, W)`` of one output image.
        value_range: ``(low, high)`` the output pixels span (mapped linearly to ``[0, 1]`` for use).
        label_input: ``"index"`` (int ``(N,)``), ``"onehot"`` (float ``(N, K)``) or ``"none"``.
        format: ``"openvino"``, ``"onnx"`` or ``"torchscript"``: what runs it.
        path: the file that is run.
        label_first: the model takes ``(label, z)`` rather than ``(z, label)`` (OpenVINO / ONNX files).
    """

    latent_size: int
    num_classes: int
    image_shape: tuple[int, int, int]
    value_range: tuple[float, float]
    label_input: str
    format: str
    path: str
    label_first: bool = False

    @property
    def conditional(self) -> bool:
        """True when the generator takes a class label (its labels are the classes it was trained on)."""
        return self.num_classes > 0


@dataclass
class Generator:
    """A loaded generator: ``info`` plus the runtime object, created on first use and never pickled.

    Instances pickle (the compiled model is dropped and rebuilt from ``info.path``), so a data source
    holding one can travel to worker processes.
    """

    info: GeneratorInfo
    _runner: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"info": self.info, "_runner": None}

    def raw(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Run the generator: float32 ``(N, C, H, W)`` in its own ``value_range`` (not clipped).

        ``z`` is float ``(N, latent_size)``; ``labels`` int ``(N,)`` in ``[0, num_classes)`` for a
        conditional generator (``None`` otherwise).
        """
        info = self.info
        z = np.ascontiguousarray(z, dtype=np.float32)
        if z.ndim != 2 or z.shape[1] != info.latent_size:
            raise EvoquantError(f"z must have shape (N, {info.latent_size}), got {z.shape}")
        if info.conditional:
            if labels is None:
                raise EvoquantError(f"the generator {info.path} is conditional: labels are required")
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if len(labels) != len(z) or (labels < 0).any() or (labels >= info.num_classes).any():
                raise EvoquantError(f"labels must be {len(z)} class indices in [0, {info.num_classes})")
        runner = self._runtime()
        chunks = []
        for start in range(0, len(z), _INFER_BATCH):
            stop = start + _INFER_BATCH
            chunk_labels = None if labels is None or not info.conditional else labels[start:stop]
            chunks.append(_to_nchw(runner(z[start:stop], chunk_labels), info.path))
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def images01(self, z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        """Run the generator and map its output linearly from ``value_range`` onto ``[0, 1]`` (clipped)."""
        low, high = self.info.value_range
        images = (self.raw(z, labels) - np.float32(low)) / np.float32(high - low)
        return np.clip(images, 0.0, 1.0)

    def sample_inputs(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Draw ``n`` latents ``N(0, I)`` and, when conditional, class-balanced labels in shuffled order.

        Balanced labels (every class ``n // K`` or ``n // K + 1`` times) keep small calibration sets
        from missing a class by chance.
        """
        z = rng.standard_normal((n, self.info.latent_size), dtype=np.float32)
        if not self.info.conditional:
            return z, None
        labels = rng.permutation(np.arange(n, dtype=np.int64) % self.info.num_classes)
        return z, labels

    def _runtime(self):
        if self._runner is None:
            self._runner = _make_runner(self.info)
        return self._runner


def load_generator(
    path: str | os.PathLike,
    *,
    latent_size: int | None = None,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    label_input: str | None = None,
) -> Generator:
    """Load a generator directory or an external generator file, check it runs, and describe it.

    Args:
        path: a generator directory (with ``generator.json``), or a ``.xml`` / ``.onnx`` /
            TorchScript file (optionally with a ``<stem>.json`` beside it in the same layout).
        latent_size, num_classes, value_range, label_input: override or supply what the metadata and
            the file do not tell (see :class:`GeneratorInfo`).

    Returns:
        A :class:`Generator` whose ``info`` is complete and checked by one probe run of 2 images.

    Raises:
        EvoquantError: missing or unreadable files, an unsupported format, inputs that are not
            ``(z[, label])``, information that cannot be determined, outputs that are not images
            ``(N, C, H, W)`` / ``(N, H, W)``, or outputs far outside the declared value range.
    """
    path = Path(path)
    if not path.exists():
        raise EvoquantError(f"no such generator: {path}")
    meta: dict = {}
    if path.is_dir():
        meta = _read_meta(path / META_FILE, required=True)
        model_file = _pick_file(path, meta)
    else:
        model_file = path
        sidecar = path.with_suffix(".json")
        if sidecar.is_file():
            meta = _read_meta(sidecar, required=False)
    overrides = {"latent_size": latent_size, "num_classes": num_classes, "value_range": value_range, "label_input": label_input}
    meta.update({key: value for key, value in overrides.items() if value is not None})

    fmt = _format_of(model_file)
    if fmt == "torchscript":
        info = _describe_torchscript(model_file, meta)
    else:
        info = _describe_openvino(model_file, fmt, meta)
    generator = Generator(info)
    return _probe(generator)


def write_json_atomically(data: dict, path: Path) -> None:
    """Write JSON to a temporary file beside ``path`` and rename it into place."""
    from evoquant.paths import write_text

    write_text(path, json.dumps(data, indent=2) + "\n")


def meta_for(info: GeneratorInfo, files: dict[str, str], **extra: Any) -> dict:
    """The ``generator.json`` content for a generator directory (``files`` maps format -> file name)."""
    data = {
        "format": META_FORMAT,
        "version": META_VERSION,
        "latent_size": info.latent_size,
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "value_range": list(info.value_range),
        "label_input": info.label_input,
        "files": files,
    }
    data.update(extra)
    return data


# --------------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------------


def _read_meta(path: Path, *, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise EvoquantError(f"{path.parent} is not a generator directory: {META_FILE} is missing "
                                "(write one with 'evoquant gan train' or point at the generator file)")
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise EvoquantError(f"cannot read {path}: {' '.join(str(error).split())}") from None
    if not isinstance(meta, dict):
        raise EvoquantError(f"{path} must hold a JSON object")
    if meta.get("format", META_FORMAT) != META_FORMAT:
        raise EvoquantError(f"{path} is not evoquant generator metadata (format {meta.get('format')!r})")
    version = meta.get("version", META_VERSION)
    if not isinstance(version, int) or version > META_VERSION:
        raise EvoquantError(f"{path} has metadata version {version!r}; this evoquant reads up to {META_VERSION}")
    return meta


def _pick_file(directory: Path, meta: dict) -> Path:
    """The file of a generator directory to run: the OpenVINO IR when present (no torch needed)."""
    files = meta.get("files") or {}
    if not isinstance(files, dict):
        raise EvoquantError(f"{directory / META_FILE}: 'files' must map a format to a file name")
    for key in ("openvino", "onnx", "torchscript"):
        name = files.get(key)
        if name and (directory / name).is_file():
            if key == "torchscript" and not _has_torch():
                continue
            return directory / name
    listed = ", ".join(f"{key}: {name}" for key, name in files.items()) or "none"
    raise EvoquantError(f"{directory} holds no usable generator file (listed: {listed})")


def _has_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".xml":
        return "openvino"
    if suffix == ".onnx":
        return "onnx"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise EvoquantError(f"unsupported generator file {path}: expected an OpenVINO IR (.xml), ONNX (.onnx), "
                        f"TorchScript ({', '.join(TORCHSCRIPT_SUFFIXES)}) or a generator directory")


def _positive_int(meta: dict, key: str, where: str, *, allow_zero: bool = False) -> int | None:
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < (0 if allow_zero else 1):
        raise EvoquantError(f"{where}: {key} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return int(value)


def _value_range(meta: dict, where: str) -> tuple[float, float]:
    value = meta.get("value_range", DEFAULT_VALUE_RANGE)
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EvoquantError(f"{where}: value_range must be two numbers [low, high], got {value!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise EvoquantError(f"{where}: value_range must be finite with low < high, got {value!r}")
    return low, high


def _label_input(meta: dict, where: str) -> str | None:
    value = meta.get("label_input")
    if value is not None and value not in LABEL_INPUTS:
        raise EvoquantError(f"{where}: label_input must be one of {', '.join(LABEL_INPUTS)}, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# OpenVINO / ONNX generators
# --------------------------------------------------------------------------------------------------


def _read_openvino(path: Path, fmt: str):
    if fmt == "openvino":
        from evoquant.ir.runtime import read_ir

        return read_ir(path)
    from evoquant.ir.runtime import core

    try:
        return core().read_model(str(path))
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("Exception from")]
        raise EvoquantError(f"OpenVINO cannot read the ONNX generator {path}: {lines[-1] if lines else 'unknown error'}") from None


def _describe_openvino(path: Path, fmt: str, meta: dict) -> GeneratorInfo:
    """Work out latent size and label form from the model's inputs, the rest from ``meta``."""
    model = _read_openvino(path, fmt)
    where = str(path)
    inputs = list(model.inputs)
    if len(inputs) not in (1, 2):
        raise EvoquantError(f"{where} has {len(inputs)} inputs; a generator takes (z) or (z, label)")

    def is_integer(port) -> bool:
        return port.get_element_type().is_integral()

    def last_dim(port) -> int | None:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or len(shape) == 0 or shape[len(shape) - 1].is_dynamic:
            return None
        return shape[len(shape) - 1].get_length()

    z_position = 0
    if len(inputs) == 2:
        # z is the float input; with two float inputs (z and a one-hot label) z is the first unless only
        # the second is named like a latent.
        integer = [is_integer(port) for port in inputs]
        if integer == [True, True]:
            raise EvoquantError(f"{where}: both inputs are integers; a generator takes float z and an optional label")
        if integer == [True, False]:
            z_position = 1
        elif integer == [False, False]:
            latent_named = [bool(set(port.get_names()) & {"z", "latent", "latents", "noise"}) for port in inputs]
            z_position = 1 if latent_named == [False, True] else 0
    z_port = inputs[z_position]
    label_port = inputs[1 - z_position] if len(inputs) == 2 else None
    if is_integer(z_port):
        raise EvoquantError(f"{where}: the latent input z must be float, it is {z_port.get_element_type()}")

    latent = _positive_int(meta, "latent_size", where) or last_dim(z_port)
    if latent is None:
        raise EvoquantError(f"{where}: the latent size is dynamic; give it (latent_size in a .json beside the file, or --latent-size)")
    if last_dim(z_port) not in (None, latent):
        raise EvoquantError(f"{where}: z has size {last_dim(z_port)} but the metadata says latent_size {latent}")

    declared = _label_input(meta, where)
    if label_port is None:
        label_form, classes = "none", 0
        if declared not in (None, "none") or (_positive_int(meta, "num_classes", where, allow_zero=True) or 0) > 0:
            raise EvoquantError(f"{where} takes only z, but its metadata describes a conditional generator")
    elif is_integer(label_port):
        label_form = "index"
        classes = _positive_int(meta, "num_classes", where)
        if classes is None:
            raise EvoquantError(f"{where} takes class indices but the number of classes is unknown; give it "
                                "(num_classes in a .json beside the file, or --classes)")
    else:
        label_form = "onehot"
        classes = last_dim(label_port) or _positive_int(meta, "num_classes", where)
        if classes is None:
            raise EvoquantError(f"{where}: the one-hot label size is dynamic; give the number of classes")
    if declared is not None and declared != label_form:
        raise EvoquantError(f"{where}: the metadata says label_input {declared!r} but the model's inputs are {label_form!r}")

    # The runner feeds inputs by position; remember which position z has.
    label_first = label_port is not None and z_position == 1
    return GeneratorInfo(latent, classes, _meta_shape(meta, where), _value_range(meta, where), label_form, fmt, str(path),
                         label_first=label_first)


def _meta_shape(meta: dict, where: str) -> tuple[int, int, int]:
    """The declared image shape, or (0, 0, 0) for "find out by running it"."""
    shape = meta.get("image_shape")
    if shape is None:
        return (0, 0, 0)
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        dims = ()
    if len(dims) != 3 or min(dims) < 1:
        raise EvoquantError(f"{where}: image_shape must be [C, H, W], got {shape!r}")
    return dims  # type: ignore[return-value]


def _openvino_runner(info: GeneratorInfo):
    from evoquant.ir.runtime import compile_ir

    model = _read_openvino(Path(info.path), info.format)
    # f32: this CPU defaults to bf16, which would make every generated image a slightly different one.
    compiled = compile_ir(model, f32=True)
    request = compiled.create_infer_request()
    z_index = 1 if info.label_first else 0
    label_index = (1 - z_index) if info.conditional else None

    def run(z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        feed = {z_index: z}
        if label_index is not None:
            port = compiled.inputs[label_index]
            label_array = _label_array(info, labels, port.get_element_type().to_dtype())
            if info.label_input == "index" and port.get_partial_shape().rank.is_static and len(port.get_partial_shape()) == 2:
                label_array = label_array[:, None]  # an index input shaped (N, 1)
            feed[label_index] = label_array
        try:
            result = request.infer(feed)
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise EvoquantError(f"the generator {info.path} failed to run: {lines[-1] if lines else 'unknown error'}") from None
        return np.asarray(result[compiled.outputs[0]], dtype=np.float32)

    return run


def _label_array(info: GeneratorInfo, labels: np.ndarray, dtype) -> np.ndarray:
    if info.label_input == "onehot":
        return np.eye(info.num_classes, dtype=dtype)[labels]
    return labels.astype(dtype)


# --------------------------------------------------------------------------------------------------
# TorchScript generators
# --------------------------------------------------------------------------------------------------


def _describe_torchscript(path: Path, meta: dict) -> GeneratorInfo:
    where = str(path)
    latent = _positive_int(meta, "latent_size", where)
    if latent is None:
        raise EvoquantError(f"{where}: TorchScript does not record input sizes; give the latent size "
                            "(latent_size in a .json beside the file, or --latent-size)")
    classes = _positive_int(meta, "num_classes", where, allow_zero=True) or 0
    label_form = _label_input(meta, where) or ("index" if classes else "none")
    if (label_form == "none") != (classes == 0):
        raise EvoquantError(f"{where}: label_input {label_form!r} does not fit num_classes {classes}")
    return GeneratorInfo(latent, classes, _meta_shape(meta, where), _value_range(meta, where), label_form, "torchscript", str(path))


def _torchscript_runner(info: GeneratorInfo):
    from evoquant.gan.models import import_torch

    torch = import_torch()
    try:
        with warnings.catch_warnings():
            # torch >= 2.10 marks TorchScript deprecated; it is still how generators are shipped.
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(info.path, map_location="cpu")
    except Exception as error:  # torch raises RuntimeError or ValueError variants for a bad archive
        raise EvoquantError(f"cannot load the TorchScript generator {info.path}: {' '.join(str(error).split())[:200]}") from None
    module.eval()

    def run(z: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
        args = [torch.from_numpy(z)]
        if info.conditional:
            if info.label_input == "onehot":
                args.append(torch.from_numpy(np.eye(info.num_classes, dtype=np.float32)[labels]))
            else:
                args.append(torch.from_numpy(labels.astype(np.int64)))
        try:
            with torch.no_grad():
                out = module(*args)
        except Exception as error:  # TorchScript errors carry the scripted traceback as text
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            raise EvoquantError(f"the generator {info.path} failed on inputs {'(z, label)' if info.conditional else '(z)'}: "
                                f"{lines[-1] if lines else type(error).__name__}") from None
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().float().numpy()

    return run


def _make_runner(info: GeneratorInfo):
    return _torchscript_runner(info) if info.format == "torchscript" else _openvino_runner(info)


# --------------------------------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------------------------------


def _to_nchw(images: np.ndarray, where: str) -> np.ndarray:
    """Bring a generator's output to ``(N, C, H, W)``: accepts NCHW, NHWC (C of 1 or 3) and NHW."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] not in (1, 3) and images.shape[3] in (1, 3):
            return images.transpose(0, 3, 1, 2)
        return images
    raise EvoquantError(f"the generator {where} outputs shape {images.shape}; expected images (N, C, H, W)")


def _probe(generator: Generator) -> Generator:
    """Run 2 images to learn/check the image shape and the value range; returns the completed generator."""
    info = generator.info
    rng = np.random.default_rng(0)
    z, labels = generator.sample_inputs(2, rng)
    images = generator.raw(z, labels)
    shape = tuple(int(d) for d in images.shape[1:])
    if info.image_shape != (0, 0, 0) and shape != info.image_shape:
        raise EvoquantError(f"the generator {info.path} makes images of shape {shape} but its metadata says {info.image_shape}")
    if not np.isfinite(images).all():
        raise EvoquantError(f"the generator {info.path} outputs NaN or infinite values")
    low, high = info.value_range
    slack = _RANGE_SLACK * (high - low)
    if images.min() < low - slack or images.max() > high + slack:
        raise EvoquantError(f"the generator {info.path} outputs values in [{images.min():.3g}, {images.max():.3g}] "
                            f"but its value range is [{low:g}, {high:g}]; give the right range (value_range / --teacher-range)")
    completed = Generator(replace(info, image_shape=shape))  # type: ignore[arg-type]
    completed._runner = generator._runner
    return completed


def info_dict(info: GeneratorInfo) -> dict:
    """``info`` as JSON-ready data."""
    data = asdict(info)
    data["image_shape"] = list(info.image_shape)
    data["value_range"] = list(info.value_range)
    return data
