"""Finite sources backed by the user's own images: an ``.npz`` archive or a folder of image files.

Both are selected by :func:`evoquant.data.load_source` when the spec is a path (they are not in
the built-in name registry).  Both validate eagerly when loaded, so a bad ``--data`` argument is
reported before any model work starts, and both sample without replacement: ``sample(n, ...)``
returns ``n`` distinct images chosen by a permutation drawn from the seed.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from evoquant.data.registry import DataSource
from evoquant.errors import EvoquantError

__all__ = ["NpzSource", "FolderSource", "IMAGE_EXTENSIONS"]

#: File extensions (lower-case) a folder source reads; anything else in the folder is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")

_IMAGE_KEYS = ("x", "images")
_LABEL_KEYS = ("y", "labels")
# ITU-R BT.601 luma weights, the same ones Pillow uses for convert("L"), so an RGB npz and an RGB
# folder give the same grayscale images.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Float images must lie in [0, 1]; allow a hair of rounding slack (values are clipped on use).
_FLOAT_SLACK = 1e-4


class _FiniteSource(DataSource):
    """Shared request checks of sources that hold a fixed number of images."""

    finite = True
    labels_are_classes = True  # the user's own labelled images

    def _check_count(self, n: int, available: int) -> None:
        if n > available:
            raise EvoquantError(f"{self.spec} holds {available} images; {n} were requested")

    def _check_channels(self, channels: int) -> None:
        if channels not in (1, 3):
            raise EvoquantError(f"{self.spec} provides grayscale or RGB images but the model takes {channels} channels")


class NpzSource(_FiniteSource):
    """Images (and optional labels) stored in an ``.npz`` archive.

    Archive layout:
        * images under ``x`` or ``images`` (``x`` wins if both exist), shaped ``(N, C, H, W)``,
          ``(N, H, W)`` (grayscale) or ``(N, H, W, C)``; C is 1 or 3.  Channels-last is assumed
          when the last dimension is 1 or 3 and the second one is not.
        * dtype ``uint8`` (0..255, divided by 255) or any float dtype already in ``[0, 1]``.
        * optional integer labels under ``y`` or ``labels``, one per image.

    Sampling adapts channels (1 -> 3 by repetition, 3 -> 1 by luma) but never resizes: the
    spatial size must match the model's exactly.

    Raises:
        EvoquantError: when the file is missing, is not a valid ``.npz``, or holds arrays that break
            the layout above (bad dtype or shape, NaN/inf, floats outside ``[0, 1]``, bad labels).
    """

    name = "npz"

    def __init__(self, spec: str, arg: str | None = None) -> None:
        super().__init__(spec, arg)
        if not os.path.isfile(spec):
            raise EvoquantError(f"no such file: {spec}")
        try:
            archive = np.load(spec, allow_pickle=False)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise EvoquantError(f"{spec} is not a valid .npz archive ({_one_line(exc)})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            # np.load happily reads a single .npy array even when the file is named .npz.
            raise EvoquantError(f"{spec} is not a .npz archive; save it with numpy.savez({spec!r}, x=images, y=labels)")
        with archive:
            keys = list(archive.files)
            image_key = next((k for k in _IMAGE_KEYS if k in keys), None)
            if image_key is None:
                found = ", ".join(keys) if keys else "nothing"
                raise EvoquantError(f"{spec} has no images: expected an array named 'x' or 'images' (found {found})")
            images = self._read(archive, image_key)
            label_key = next((k for k in _LABEL_KEYS if k in keys), None)
            labels = self._read(archive, label_key) if label_key is not None else None

        self._images, self._channels_last = self._check_images(images)
        n, c, h, w = self.image_shape
        self._labels = self._check_labels(labels, n, label_key) if labels is not None else None

    # -- loading ------------------------------------------------------------------------------

    def _read(self, archive: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
        try:
            return archive[key]
        except ValueError as exc:
            if "allow_pickle" in str(exc):
                # Object arrays need pickle, which we never enable for user files.
                raise EvoquantError(f"{self.spec}: '{key}' has dtype object; expected uint8 or float images "
                                    "and integer labels") from None
            raise EvoquantError(f"{self.spec}: cannot read '{key}' ({_one_line(exc)})") from None
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise EvoquantError(f"{self.spec} is not a valid .npz archive ({_one_line(exc)})") from None

    def _check_images(self, x: np.ndarray) -> tuple[np.ndarray, bool]:
        spec = self.spec
        if x.dtype != np.uint8 and not np.issubdtype(x.dtype, np.floating):
            raise EvoquantError(f"{spec}: images have dtype {x.dtype}; expected uint8 (0..255) or float (0..1)")
        if x.ndim == 3:
            x = x[:, None]                                  # (N, H, W) grayscale -> (N, 1, H, W)
            channels_last = False
        elif x.ndim == 4:
            channels_last = x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3)
        else:
            raise EvoquantError(f"{spec}: images have shape {x.shape}; expected (N, C, H, W), (N, H, W) or (N, H, W, C)")
        channels = x.shape[-1] if channels_last else x.shape[1]
        if channels not in (1, 3):
            raise EvoquantError(f"{spec}: images have shape {x.shape}; expected 1 or 3 channels "
                                "as (N, C, H, W), (N, H, W) or (N, H, W, C)")
        if x.shape[0] == 0 or x.size == 0:
            raise EvoquantError(f"{spec} holds no images")
        if x.dtype != np.uint8:
            if not np.isfinite(x).all():
                raise EvoquantError(f"{spec}: images contain NaN or infinite values")
            lo, hi = float(x.min()), float(x.max())
            if lo < -_FLOAT_SLACK or hi > 1.0 + _FLOAT_SLACK:
                raise EvoquantError(f"{spec}: float images must be in [0, 1] but range over [{lo:g}, {hi:g}] "
                                    "(store 0..255 data as uint8)")
        return x, channels_last

    def _check_labels(self, y: np.ndarray, n: int, key: str) -> np.ndarray:
        spec = self.spec
        if y.dtype == np.bool_ or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise EvoquantError(f"{spec}: labels '{key}' have dtype {y.dtype}; expected integers")
        if y.size != n or (y.ndim > 1 and max(y.shape) != n):
            raise EvoquantError(f"{spec}: labels '{key}' have shape {y.shape} but there are {n} images")
        y = y.reshape(n)
        if np.issubdtype(y.dtype, np.floating):
            # Labels exported through float arrays (e.g. from pandas) are fine if they are whole.
            if not np.isfinite(y).all() or not np.array_equal(y, np.round(y)):
                raise EvoquantError(f"{spec}: labels '{key}' must be whole numbers")
        y = y.astype(np.int64)
        if (y < 0).any():
            raise EvoquantError(f"{spec}: labels '{key}' must be non-negative class indices")
        return y

    # -- sampling -----------------------------------------------------------------------------

    @property
    def image_shape(self) -> tuple[int, int, int, int]:
        """``(N, C, H, W)`` of the stored images."""
        x = self._images
        if self._channels_last:
            return (x.shape[0], x.shape[3], x.shape[1], x.shape[2])
        return tuple(x.shape)  # type: ignore[return-value]

    def __len__(self) -> int:
        return self.image_shape[0]

    def _sample01(self, n, shape, rng):
        count, src_c, src_h, src_w = self.image_shape
        channels, height, width = shape
        self._check_channels(channels)
        if (src_h, src_w) != (height, width):
            raise EvoquantError(f"{self.spec} has images of {src_h}x{src_w} but the model takes {height}x{width}")
        self._check_count(n, count)

        idx = rng.permutation(count)[:n]
        x = self._images[idx]
        if self._channels_last:
            x = x.transpose(0, 3, 1, 2)
        x = x.astype(np.float32)
        if self._images.dtype == np.uint8:
            x /= np.float32(255.0)
        x = _adapt_channels(x, channels)
        labels = self._labels[idx] if self._labels is not None else None
        return x, labels


class FolderSource(_FiniteSource):
    """Image files in a directory, either flat (no labels) or one sub-folder per class.

    Layout:
        * flat: image files directly in the folder -> ``labels`` is ``None``;
        * classes: only sub-folders, each holding image files -> the sorted sub-folder names are
          classes ``0..K-1`` and each image is labelled by its folder.
        Hidden entries (names starting with ``.``) and files with other extensions are ignored;
        class sub-folders are not searched recursively.

    Images (any of :data:`IMAGE_EXTENSIONS`, via Pillow) are decoded only when sampled, converted
    to ``L`` (C=1) or ``RGB`` (C=3) and resized to the requested size with bilinear filtering.

    Raises:
        EvoquantError: when the folder holds no images, mixes loose images with class
            sub-folders, has an empty class sub-folder, or an image cannot be decoded.
    """

    name = "folder"

    def __init__(self, spec: str, arg: str | None = None) -> None:
        super().__init__(spec, arg)
        root = spec
        if not os.path.isdir(root):
            raise EvoquantError(f"no such folder: {spec}")
        loose, subdirs = _scan(root)
        exts = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        if loose and subdirs:
            raise EvoquantError(f"folder {spec} mixes image files with sub-folders; put all images either directly "
                                "in it or in one sub-folder per class")
        if loose:
            self.classes: list[str] | None = None
            self._files = [os.path.join(root, f) for f in loose]
            self._labels: np.ndarray | None = None
            return
        if not subdirs:
            raise EvoquantError(f"folder {spec} holds no images ({exts})")
        files: list[str] = []
        labels: list[int] = []
        for label, sub in enumerate(subdirs):
            inner, _ = _scan(os.path.join(root, sub))
            if not inner:
                raise EvoquantError(f"class folder {os.path.join(spec, sub)} holds no images ({exts})")
            files += [os.path.join(root, sub, f) for f in inner]
            labels += [label] * len(inner)
        self.classes = subdirs
        self._files = files
        self._labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._files)

    @property
    def files(self) -> list[str]:
        """Paths of the image files, in label order (sorted class folders, then sorted names)."""
        return list(self._files)

    def _sample01(self, n, shape, rng):
        channels, height, width = shape
        self._check_channels(channels)
        self._check_count(n, len(self._files))
        idx = rng.permutation(len(self._files))[:n]
        images = np.empty((n, channels, height, width), np.float32)
        for out, i in enumerate(idx):
            images[out] = self._load(self._files[i], channels, height, width)
        labels = self._labels[idx] if self._labels is not None else None
        return images, labels

    def _load(self, path: str, channels: int, height: int, width: int) -> np.ndarray:
        """Decode one file as float32 ``(C, H, W)`` in ``[0, 1]``."""
        from PIL import Image  # Pillow is only needed when a folder is actually used.

        try:
            with Image.open(path) as im:
                if im.mode == "I" or im.mode.startswith("I;16"):  # 16-bit grayscale: 0..65535, not clipped to 8 bits
                    im = im.convert("I").convert("F")
                    if im.size != (width, height):
                        im = im.resize((width, height), Image.Resampling.BILINEAR)
                    gray = np.clip(np.asarray(im, dtype=np.float32) / np.float32(65535.0), 0.0, 1.0)
                    return np.repeat(gray[None], channels, axis=0)
                im = im.convert("L" if channels == 1 else "RGB")
                if im.size != (width, height):
                    im = im.resize((width, height), Image.Resampling.BILINEAR)
                pixels = np.asarray(im, dtype=np.float32) / np.float32(255.0)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise EvoquantError(f"cannot read image {path}: {_one_line(exc)}") from None
        return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """Sorted ``(image file names, sub-folder names)`` directly inside ``folder``, hidden ones skipped."""
    images: list[str] = []
    subdirs: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise EvoquantError(f"cannot list folder {folder}: {_one_line(exc)}") from None
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            subdirs.append(entry.name)
        elif entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
            images.append(entry.name)
    return sorted(images), sorted(subdirs)


def _adapt_channels(x: np.ndarray, channels: int) -> np.ndarray:
    """Convert ``(N, C, H, W)`` images with C in {1, 3} to ``channels`` (1 or 3) channels."""
    have = x.shape[1]
    if have == channels:
        return x
    if have == 1:
        return np.repeat(x, channels, axis=1)               # gray -> RGB: same value everywhere
    return np.einsum("nchw,c->nhw", x, _LUMA)[:, None]      # RGB -> gray: luma


def _one_line(exc: BaseException) -> str:
    """An exception's message squeezed onto one line (user-facing messages are single lines)."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
