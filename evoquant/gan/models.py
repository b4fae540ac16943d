"""The compact class-conditional GAN: generator and spectral-norm projection discriminator (torch).

Built in the spirit of DiStyleGAN (the ~2M-parameter student of arXiv 2305.06052) and of the SNGAN /
BigGAN family it borrows from:

* **Generator** ``(z, label) -> image``: the class embedding is concatenated with ``z``, a linear layer
  makes a small ``base x base`` feature map, then ``k`` blocks of (class-conditional BatchNorm, ReLU,
  nearest 2x upsampling, 3x3 convolution) double the size, and a last 3x3 convolution with ``tanh``
  gives pixels in ``[-1, 1]``. The result is centre-cropped to the exact ``(H, W)``, so any image size
  works (28 = 7 * 2 * 2, 32 = 4 * 2 * 2 * 2, 10 = 5 * 2 ...).
* **Discriminator**: spectral-normalised convolutions (LeakyReLU 0.2) halving the size ``k`` times,
  a minibatch-standard-deviation channel and one more convolution (StyleGAN's cure for a generator
  that ignores ``z``), global sum pooling, then ``linear(h) + <embed(label), h>`` -- the projection discriminator of Miyato
  & Koyama (2018), the conditioning that makes class-correct samples cheap to learn.
  :meth:`forward` also returns the intermediate feature maps, which distillation compares.

``num_classes == 0`` builds the unconditional variants (plain BatchNorm, no projection term).

torch is imported inside :func:`module_classes` only, so importing this module never needs torch.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from evoquant.errors import EvoquantError

__all__ = ["GanShape", "module_classes", "create_generator", "create_discriminator", "import_torch"]

# Upsampling stops once the smaller side of the starting map would drop below this many pixels: a
# 4x4 start is the usual DCGAN/SNGAN choice; smaller starts waste the linear layer on borders.
_MIN_BASE = 4
_MAX_UPSAMPLINGS = 5


def import_torch() -> Any:
    """Return the ``torch`` module, or raise :class:`EvoquantError` telling how to install it."""
    try:
        import torch
    except ImportError:
        raise EvoquantError("training and converting generators needs torch: pip install 'evoquant[zoo]'") from None
    return torch


class GanShape:
    """The geometry shared by a generator and its discriminator for one image shape.

    Attributes:
        image_shape: ``(C, H, W)`` of the generated images.
        upsamplings: number of 2x stages ``k``.
        base: ``(h0, w0)`` size of the starting map; ``(h0 * 2**k, w0 * 2**k)`` covers ``(H, W)``.
    """

    def __init__(self, image_shape: tuple[int, int, int]) -> None:
        channels, height, width = (int(v) for v in image_shape)
        if channels < 1 or height < 1 or width < 1:
            raise EvoquantError(f"image shape must be three positive integers (C, H, W), got {image_shape}")
        self.image_shape = (channels, height, width)
        smallest = min(height, width)
        self.upsamplings = max(0, min(_MAX_UPSAMPLINGS, int(math.floor(math.log2(smallest / _MIN_BASE))) if smallest >= _MIN_BASE else 0))
        scale = 2 ** self.upsamplings
        self.base = (-(-height // scale), -(-width // scale))


@functools.lru_cache(maxsize=1)
def module_classes() -> tuple[type, type]:
    """Return ``(Generator, Discriminator)``: torch module classes defined on first use.

    Defined lazily because their base class comes from torch, which must not be imported when
    evoquant is.
    """
    torch = import_torch()
    nn = torch.nn
    spectral_norm = nn.utils.parametrizations.spectral_norm

    def _group_std(h: Any, max_group: int = 4) -> Any:
        """Per group of up to 4 images: the mean over features of the standard deviation across the group."""
        n, channels, height, width = h.shape
        group = math.gcd(max_group, n)
        grouped = h.reshape(group, n // group, channels, height, width)
        std = (grouped.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (n // group,)
        return std.reshape(1, -1, 1, 1, 1).expand(group, -1, 1, height, width).reshape(n, 1, height, width)

    class ConditionalBatchNorm(nn.Module):
        """BatchNorm without affine parameters, then a per-class scale and shift (BigGAN-style)."""

        def __init__(self, channels: int, num_classes: int) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(channels, affine=num_classes == 0)
            self.num_classes = num_classes
            if num_classes:
                self.gain = nn.Embedding(num_classes, channels)
                self.bias = nn.Embedding(num_classes, channels)
                nn.init.ones_(self.gain.weight)
                nn.init.zeros_(self.bias.weight)

        def forward(self, x: Any, label: Any) -> Any:
            out = self.norm(x)
            if self.num_classes:
                out = out * self.gain(label)[:, :, None, None] + self.bias(label)[:, :, None, None]
            return out

    class UpBlock(nn.Module):
        """Conditional BN, ReLU, nearest 2x upsampling, 3x3 convolution."""

        def __init__(self, cin: int, cout: int, num_classes: int) -> None:
            super().__init__()
            self.norm = ConditionalBatchNorm(cin, num_classes)
            self.conv = nn.Conv2d(cin, cout, 3, padding=1)

        def forward(self, x: Any, label: Any) -> Any:
            out = torch.relu(self.norm(x, label))
            return self.conv(nn.functional.interpolate(out, scale_factor=2.0, mode="nearest"))

    class Generator(nn.Module):
        """``forward(z, label) -> images`` in ``[-1, 1]``, ``(N, C, H, W)``; ``label`` is int64 ``(N,)``.

        Unconditional generators (``num_classes == 0``) ignore ``label`` but keep the argument, so every
        generator has the same call signature (exported unconditional ones take ``z`` only).
        """

        def __init__(self, latent_size: int, num_classes: int, image_shape: tuple[int, int, int], width: int) -> None:
            super().__init__()
            shape = GanShape(image_shape)
            self.latent_size = latent_size
            self.num_classes = num_classes
            self.image_shape = shape.image_shape
            self.base = shape.base
            k = shape.upsamplings
            channels = [width * 2 ** (k - i) for i in range(k + 1)]  # e.g. 4w, 2w, w for k = 2
            self.base_channels = channels[0]
            # The class enters twice: concatenated with z (sets the layout of the digit) and through
            # conditional BN at every scale (sets its strokes), as in BigGAN and DiStyleGAN.
            self.embed = nn.Embedding(num_classes, latent_size) if num_classes else None
            inputs = latent_size * (2 if num_classes else 1)
            self.project = nn.Linear(inputs, channels[0] * shape.base[0] * shape.base[1])
            self.blocks = nn.ModuleList(UpBlock(channels[i], channels[i + 1], num_classes) for i in range(k))
            self.out_norm = ConditionalBatchNorm(channels[-1], num_classes)
            self.out_conv = nn.Conv2d(channels[-1], shape.image_shape[0], 3, padding=1)

        def forward(self, z: Any, label: Any) -> Any:
            h = torch.cat([z, self.embed(label)], dim=1) if self.embed is not None else z
            # The batch size from the input, not -1: exporters (ONNX) then know every other dimension.
            h = self.project(h).view(z.shape[0], self.base_channels, self.base[0], self.base[1])
            for block in self.blocks:
                h = block(h, label)
            h = torch.tanh(self.out_conv(torch.relu(self.out_norm(h, label))))
            _, height, width = self.image_shape
            top = (h.shape[2] - height) // 2
            left = (h.shape[3] - width) // 2
            return h[:, :, top : top + height, left : left + width]

    class Discriminator(nn.Module):
        """``forward(images, label) -> (scores (N,), [feature maps])``; spectral norm on every layer."""

        def __init__(self, num_classes: int, image_shape: tuple[int, int, int], width: int) -> None:
            super().__init__()
            shape = GanShape(image_shape)
            k = max(1, shape.upsamplings)
            layers = [spectral_norm(nn.Conv2d(shape.image_shape[0], width, 3, padding=1))]
            cin = width
            for i in range(k):
                cout = width * 2 ** (i + 1)
                # A stride-2 4x4 convolution halves the size; a 3x3 after it adds depth at that scale.
                layers.append(spectral_norm(nn.Conv2d(cin, cout, 4, stride=2, padding=1)))
                layers.append(spectral_norm(nn.Conv2d(cout, cout, 3, padding=1)))
                cin = cout
            self.layers = nn.ModuleList(layers)
            # Minibatch standard deviation (StyleGAN): one extra channel holding how much the images of a
            # small group differ, so the discriminator can tell a collapsed generator -- same digit for
            # every z -- from the data.
            self.group_std = spectral_norm(nn.Conv2d(cin + 1, cin, 3, padding=1))
            self.linear = spectral_norm(nn.Linear(cin, 1))
            self.embed = spectral_norm(nn.Embedding(num_classes, cin)) if num_classes else None

        def forward(self, x: Any, label: Any) -> tuple[Any, list[Any]]:
            features = []
            h = x
            for layer in self.layers:
                h = nn.functional.leaky_relu(layer(h), 0.2)
                features.append(h)
            h = nn.functional.leaky_relu(self.group_std(torch.cat([h, _group_std(h)], dim=1)), 0.2)
            features.append(h)
            pooled = h.sum(dim=(2, 3))
            score = self.linear(pooled).squeeze(1)
            if self.embed is not None:
                score = score + (self.embed(label) * pooled).sum(dim=1)
            return score, features

    return Generator, Discriminator


def create_generator(*, latent_size: int, num_classes: int, image_shape: tuple[int, int, int], width: int) -> Any:
    """A freshly initialised generator (draws from torch's global RNG; seed it first)."""
    generator_class, _ = module_classes()
    return generator_class(latent_size, num_classes, tuple(image_shape), width)


def create_discriminator(*, num_classes: int, image_shape: tuple[int, int, int], width: int) -> Any:
    """A freshly initialised spectral-norm projection discriminator (draws from torch's global RNG)."""
    _, discriminator_class = module_classes()
    return discriminator_class(num_classes, tuple(image_shape), width)
