"""Real architecture families in plain torch: a ResNet-18, a MobileNetV3-small and a small ViT.

The models users bring evoquant come from model libraries (torchvision, timm): residual networks,
mobile networks with depthwise convolutions, squeeze-excitation and hard-swish, and vision transformers.
Neither library can be installed next to the pinned CPU torch here, so the same layer structure is written
out below, sized for 32x32 inputs (CIFAR-style stems: a 3x3 stride-1 stem for the ResNet, one stride-2
stem for the MobileNet). ``width`` scales every channel count (the zoo trains them at 1.0, the tests build
tiny ones); the graphs OpenVINO gets are the same ops a library model gives: Convolution, GroupConvolution
(depthwise), MatMul (Linear, attention projections), Add skips, HSwish/HSigmoid, LayerNorm's MVN, GELU,
Softmax.

This module imports torch at load time: import it only where torch is needed (the zoo does so lazily).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BasicBlock", "InvertedResidual", "SqueezeExcite", "ViT", "mobilenet_v3_small", "resnet18"]


def _channels(value: float, divisor: int = 8) -> int:
    """``value`` rounded to a multiple of ``divisor`` (at least one divisor), never below 90 % of it
    (MobileNet's rule, so a narrow width still gives hardware-friendly channel counts)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, an identity or (strided) 1x1 conv-BN shortcut, ReLU after the add."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Identity() if stride == 1 and cin == cout
                         else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18(*, width: float = 0.25, in_channels: int = 3, classes: int = 10, blocks: tuple[int, ...] = (2, 2, 2, 2)) -> nn.Module:
    """ResNet-18: a 3x3 stem, four stages of two basic blocks (64, 128, 256, 512 channels times ``width``;
    stages 2-4 halve the resolution through strided projection shortcuts), global average pool, Linear.
    ``blocks`` sets the blocks per stage (fewer for tests)."""
    widths = [_channels(c * width) for c in (64, 128, 256, 512)][: len(blocks)]
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()]
    cin = widths[0]
    for stage, (cout, count) in enumerate(zip(widths, blocks)):
        for index in range(count):
            layers.append(BasicBlock(cin, cout, 2 if stage > 0 and index == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Squeeze-excitation as MobileNetV3 has it: pool, 1x1 conv, ReLU, 1x1 conv, hard-sigmoid, scale."""

    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand (skipped when the width does not grow), depthwise kxk, optional
    squeeze-excitation, 1x1 linear projection; a residual add when shape is kept."""

    def __init__(self, cin: int, hidden: int, cout: int, kernel: int, stride: int, se: bool, hswish: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        layers: list[nn.Module] = []
        if hidden != cin:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), act()]
        layers += [nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False), nn.BatchNorm2d(hidden), act()]
        if se:
            layers.append(SqueezeExcite(hidden, _channels(hidden / 4)))
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.residual else self.block(x)


# MobileNetV3-small's blocks (Howard et al. 2019, table 2): kernel, expansion, output, SE, hard-swish, stride.
_MOBILENET_V3_SMALL = (
    (3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1),
)


def mobilenet_v3_small(*, width: float = 1.0, in_channels: int = 3, classes: int = 10, blocks: int | None = None, head: int = 1024) -> nn.Module:
    """MobileNetV3-small: a stride-2 3x3 hard-swish stem, the paper's eleven inverted-residual blocks
    (channel counts times ``width``), a 1x1 conv to 6x the last width, pool, Linear-hard-swish-Linear
    head. At 32x32 input the first block keeps its resolution (the stem already halved it), so the
    last stage runs at 2x2. ``blocks`` keeps only the first ones (tests)."""
    table = _MOBILENET_V3_SMALL[: blocks if blocks is not None else len(_MOBILENET_V3_SMALL)]
    stem = _channels(16 * width)
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 2, 1, bias=False), nn.BatchNorm2d(stem), nn.Hardswish()]
    cin = stem
    for index, (kernel, expansion, out, se, hswish, stride) in enumerate(table):
        hidden, cout = _channels(expansion * width), _channels(out * width)
        layers.append(InvertedResidual(cin, hidden, cout, kernel, 1 if index == 0 else stride, se, hswish))
        cin = cout
    last = _channels(6 * cin)
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(last, head), nn.Hardswish(), nn.Linear(head, classes)]
    return nn.Sequential(*layers)


class _Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (as timm's ViT)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class _Block(nn.Module):
    """Pre-norm transformer block: LayerNorm, attention, add; LayerNorm, Linear-GELU-Linear MLP, add."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attention = nn.LayerNorm(dim), _Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision transformer: a strided-conv patch embedding, a class token and learned positions,
    ``depth`` pre-norm blocks, a final LayerNorm and a Linear head on the class token."""

    def __init__(self, *, image_size: int = 32, patch: int = 4, dim: int = 96, depth: int = 6, heads: int = 4, mlp_ratio: float = 2.0,
                 in_channels: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])
