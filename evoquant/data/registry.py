"""The data-source contract, the registry of built-in sources, and the ``--data SPEC`` parser.

Every command that needs input images takes one spec string and turns it into a
:class:`DataSource` with :func:`load_source`.  The grammar is the same everywhere:

* ``path/to/file.npz``      -- an ``.npz`` archive of images (see :mod:`evoquant.data.files`);
* ``path/to/folder``        -- an existing directory of image files, flat or one sub-folder per class;
* ``NAME`` or ``NAME:ARG``  -- a registered built-in generator, e.g. ``fractal``, ``fractal:128``,
  ``noise:gaussian``.

A source hands out images through :meth:`DataSource.sample`, always as a :class:`Batch` of
float32 NCHW arrays in the caller's ``value_range``.  Sources only produce images in their natural
``[0, 1]`` range (:meth:`DataSource._sample01`); the base class validates the request, maps to the
requested range and enforces the dtype/layout contract, so every source behaves the same way.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from evoquant.errors import EvoquantError

__all__ = ["Batch", "DataSource", "register_source", "list_sources", "load_source"]


@dataclass(frozen=True)
class Batch:
    """A batch of input images handed to a model.

    Attributes:
        images: float32 array shaped ``(N, C, H, W)``, C-contiguous, values inside the
            ``value_range`` that was requested from :meth:`DataSource.sample`.
        labels: int64 array shaped ``(N,)`` with the class index of every image, or ``None``
            when the source has no notion of labels (e.g. noise, a flat folder).
    """

    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.images.shape[0])


class DataSource:
    """Base class of every data source.

    Class/instance attributes:
        name: registry name of the source kind (``"fractal"``, ``"noise"``, ``"npz"``, ``"folder"``).
        spec: the exact spec string the source was built from (used in messages and logs).
        finite: ``True`` when the source holds a limited set of images (files, folders), so
            :meth:`sample` can fail when more images are requested than exist; ``False`` for
            procedural generators that can produce any number of images.
        labels_are_classes: ``True`` when the labels are the classes the user's model predicts
            (a labelled ``.npz`` or class folder, a conditional GAN trained on the model's data), so
            accuracy and cross-entropy on them mean something; ``False`` when they only index
            something synthetic (a fractal's system).

    Subclasses implement :meth:`_sample01`; they should not override :meth:`sample`.
    """

    name: str = "?"
    finite: bool = False
    labels_are_classes: bool = False

    def __init__(self, spec: str, arg: str | None = None) -> None:
        """Build the source from its spec; ``arg`` is the part after ``NAME:`` for built-ins.

        Subclasses must validate ``arg`` here and raise :class:`EvoquantError` for bad values, so a
        wrong spec is reported as soon as it is loaded rather than at the first ``sample`` call.
        """
        self.spec = spec
        self.arg = arg

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"

    def sample(
        self,
        n: int,
        shape: tuple[int, int, int],
        *,
        seed: int,
        value_range: tuple[float, float] = (0.0, 1.0),
    ) -> Batch:
        """Return ``n`` images shaped ``(C, H, W) = shape`` as a :class:`Batch`.

        Contract:
            * ``images`` is float32, ``(n, C, H, W)``, C-contiguous, every value inside
              ``value_range``; it is the linear map of the source's natural ``[0, 1]`` images
              onto ``[lo, hi]``.
            * Deterministic: the same ``(n, shape, seed, value_range)`` gives identical arrays.
            * Finite sources return ``n`` distinct images drawn without replacement by a
              permutation derived from ``seed``, and raise :class:`EvoquantError` when ``n`` is
              larger than the number of images they hold.
            * Procedural sources generate the images from ``seed``; different seeds give
              different images.
            * ``labels`` is int64 ``(n,)`` or ``None`` when the source has no labels.

        Raises:
            EvoquantError: for a bad request (``n < 1``, a malformed shape, a negative seed, an
                empty or non-finite ``value_range``) or when the source cannot satisfy it.
        """
        n = _check_int("number of images", n, minimum=1)
        shape = _check_shape(shape)
        seed = _check_int("seed", seed, minimum=0)
        lo, hi = _check_range(value_range)
        _check_memory(n, shape)

        images01, labels = self._sample01(n, shape, np.random.default_rng(seed))

        # Sources promise [0, 1]; clip anyway so float rounding in a source (or in the linear map
        # below) can never leave a value a hair outside the range the caller asked for.
        images = np.clip(np.asarray(images01, dtype=np.float32), 0.0, 1.0)
        if (lo, hi) != (0.0, 1.0):
            images = np.clip(images * np.float32(hi - lo) + np.float32(lo), lo, hi).astype(np.float32)
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.shape != (n, *shape):
            raise AssertionError(f"{self!r} produced images of shape {images.shape}, expected {(n, *shape)}")

        if labels is not None:
            labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(n)
        return Batch(images=images, labels=labels)

    def _sample01(
        self, n: int, shape: tuple[int, int, int], rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Produce ``n`` images ``(n, C, H, W)`` with values in ``[0, 1]`` and their labels (or ``None``).

        ``rng`` is freshly seeded for this call, so using it is what makes :meth:`sample`
        deterministic.  Arguments are already validated by :meth:`sample`.
        """
        raise NotImplementedError


def _check_memory(n: int, shape: tuple[int, int, int]) -> None:
    """Refuse a draw whose images alone would take more than half the machine's memory (``synth -n 1e10``
    must be an error, not an out-of-memory kill)."""
    needed = 2 * n * int(np.prod(shape)) * 4  # the draw and its float32 copy
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): no check
        return
    if needed > memory // 2:
        raise EvoquantError(f"{n} images of shape {'x'.join(map(str, shape))} need {needed / 2**30:.1f} GiB; this machine has "
                            f"{memory / 2**30:.1f} GiB of memory: draw fewer")


# --------------------------------------------------------------------------------------------
# Registry of built-in (``NAME[:ARG]``) sources.
# --------------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[DataSource]] = {}

_S = TypeVar("_S", bound=type[DataSource])


def register_source(name: str) -> Callable[[_S], _S]:
    """Class decorator that registers a :class:`DataSource` subclass under ``name``.

    ``@register_source("fractal")`` makes the spec ``fractal`` / ``fractal:ARG`` build that class
    with ``cls(spec, arg)`` and sets ``cls.name = "fractal"``.  Names are lower-case identifiers
    without ``:`` or path separators, and each can be registered once (re-registering the same
    class is allowed so module reloads do not break).
    """
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"invalid data source name {name!r}")
    if name != name.lower():
        raise ValueError(f"data source names are lower-case, got {name!r}")

    def decorate(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, DataSource)):
            raise TypeError(f"@register_source({name!r}) must decorate a DataSource subclass")
        previous = _REGISTRY.get(name)
        if previous is not None and previous.__qualname__ != cls.__qualname__:
            raise ValueError(f"data source {name!r} is already registered by {previous.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def list_sources() -> list[str]:
    """Names of the registered built-in sources (usable as ``NAME`` / ``NAME:ARG`` specs), sorted.

    File and folder sources are not in this list: they are selected by the spec being a path.
    """
    return sorted(_REGISTRY)


def load_source(spec: str) -> DataSource:
    """Turn a ``--data`` spec string into a ready :class:`DataSource`.

    Resolution order:
        1. an existing directory                 -> folder-of-images source;
        2. ``NAME:ARG`` with a registered ``NAME`` -> that built-in, built with ``ARG`` (which may be a
           path, e.g. ``gan:runs/generator``);
        3. a path ending in ``.npz``             -> npz source (missing file -> error);
        4. an existing file that is not ``.npz`` -> error (unsupported file type);
        5. anything path-looking (contains ``/`` or the OS separator) -> ``no such file`` error;
        6. ``NAME``                              -> registered built-in ``NAME``, built without argument.

    Raises:
        EvoquantError: for an empty spec, a missing or unreadable file, an unknown name (the
            message lists the registered names), or an argument the source rejects.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EvoquantError("empty data spec; expected a built-in name (" + ", ".join(list_sources())
                            + "), a .npz file or a folder of images")
    spec = spec.strip()

    # Imported here because files.py imports this module (it subclasses DataSource).
    from evoquant.data import files

    # Paths are checked before names so a folder called "noise" in the working directory wins
    # over the built-in: the user can always write "noise:uniform" to get the generator.
    if os.path.isdir(spec):
        return files.FolderSource(spec)
    name, sep, arg = spec.partition(":")
    key = name.strip().lower()
    if sep and key in _REGISTRY:
        # A built-in whose argument is a path (gan:GEN_DIR): the path rules below are about the spec
        # itself being a file or folder, not about a built-in's argument.
        return _REGISTRY[key](spec, arg.strip())
    if spec.lower().endswith(".npz"):
        if not os.path.exists(spec):
            raise EvoquantError(f"no such file: {spec}")
        return files.NpzSource(spec)
    if os.path.isfile(spec):
        raise EvoquantError(f"unsupported data file {spec}: expected a .npz archive or a folder of images")
    if "/" in spec or os.sep in spec or (os.altsep and os.altsep in spec):
        raise EvoquantError(f"no such file: {spec}")

    cls = _REGISTRY.get(key)
    if cls is None:
        raise EvoquantError(
            f"unknown data source '{name}'; expected one of: {', '.join(list_sources())}, "
            "a path to a .npz file, or a folder of images"
        )
    return cls(spec, arg.strip() if sep else None)


def spec_path(spec: str) -> tuple[str, str]:
    """The file or folder a data spec stands for, and the prefix before it: ``("gan:", DIR)`` for a
    generator, ``("", spec)`` for anything else (which is a path only if it exists)."""
    spec = str(spec)
    return ("gan:", spec[len("gan:") :]) if spec.startswith("gan:") else ("", spec)


# --------------------------------------------------------------------------------------------
# Argument validation shared by all sources.
# --------------------------------------------------------------------------------------------

def _check_int(what: str, value: object, *, minimum: int) -> int:
    # bool is an int subclass; sample(True, ...) is a bug in the caller, not "1 image".
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise EvoquantError(f"{what} must be an integer, got {value!r}")
    if value < minimum:
        raise EvoquantError(f"{what} must be at least {minimum}, got {int(value)}")
    return int(value)


def _check_shape(shape: object) -> tuple[int, int, int]:
    try:
        dims = tuple(shape)  # type: ignore[arg-type]
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d < 1
                             for d in dims):
        raise EvoquantError(f"image shape must be three positive integers (C, H, W), got {shape!r}")
    return (int(dims[0]), int(dims[1]), int(dims[2]))


def _check_range(value_range: object) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise EvoquantError(f"value range must be two numbers (low, high), got {value_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or not lo < hi:
        raise EvoquantError(f"value range must be finite with low < high, got ({lo:g}, {hi:g})")
    return lo, hi
