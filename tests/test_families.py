"""Real architecture families, saved as users save them: a ResNet (basic blocks, strided shortcuts), a
MobileNetV3 (depthwise, squeeze-excitation, hard-swish) and a ViT (patch embedding, attention, LayerNorm,
GELU), in plain torch at small width with seeded random weights, converted with
``ov.convert_model(m, example_input=x)`` (a fully dynamic input shape) and saved with ``ov.save_model``'s
defaults (FP16-compressed weights). Each is quantized by ``evoquant quantize`` at W8A8 and W4A8 and
refined through the CLI: every weighted layer is refined or reported, the IR keeps its dynamic shape, and
the result is never worse than NNCF's on the verification images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import openvino as ov  # noqa: E402

from evoquant.ir.runtime import read_ir  # noqa: E402
from test_cli import run_cli  # noqa: E402

SIZE = 16


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.shortcut(x))


def resnet() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), BasicBlock(8, 8, 1), BasicBlock(8, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, channels // 4, 1), nn.Conv2d(channels // 4, channels, 1)

    def forward(self, x):
        scale = nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * scale


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.Hardswish(),
            SqueezeExcite(hidden), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


def mobilenet_v3() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish(), InvertedResidual(8, 16, 8, 1), InvertedResidual(8, 24, 16, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 32), nn.Hardswish(), nn.Linear(32, 10))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (dim // self.heads) ** -0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(batch, tokens, dim))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, dim: int = 32, patch: int = 4, depth: int = 2, heads: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.position = nn.Parameter(torch.randn(1, (SIZE // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.position
        return self.head(self.norm(self.blocks(tokens))[:, 0])


FAMILIES = {"resnet": resnet, "mobilenet_v3": mobilenet_v3, "vit": ViT}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each family's FP32 IR as users save it."""
    folder = tmp_path_factory.mktemp("families")
    paths = {}
    for name, factory in FAMILIES.items():
        torch.manual_seed(0)
        model = factory().eval()
        ov_model = ov.convert_model(model, example_input=torch.rand(1, 3, SIZE, SIZE))
        ov.save_model(ov_model, folder / f"{name}.xml")  # the defaults: FP16-compressed weights
        paths[name] = folder / f"{name}.xml"
    return paths


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_family_quantizes_and_refines_as_saved(saved, tmp_path, family, bits):
    fp32 = saved[family]
    assert read_ir(fp32).inputs[0].get_partial_shape().is_dynamic
    extra = ["--model-type", "transformer"] if family == "vit" else []
    int8 = tmp_path / "int8.xml"
    code, _, stderr = run_cli("quantize", str(fp32), "-c", "fractal", "--subset-size", "64", "--input-shape", f"1,3,{SIZE},{SIZE}", "--weight-bits", str(bits), *extra, "-o", str(int8))
    assert code == 0, stderr
    code, out, _ = run_cli("inspect", str(int8), "--json")
    listing = json.loads(out)
    assert listing["weights"], f"no quantized weights found in the {family} W{bits} model"
    code, stdout, stderr = run_cli("refine", str(int8), "-r", str(fp32), "--input-shape", f"1,3,{SIZE},{SIZE}", "--stages", "reconstruct", "--selection-size", "128",
                                   "--verification-size", "128", "--selection-pool", "256", "-q", "-o", str(tmp_path / "refined.xml"), "--report", str(tmp_path / "r.json"))
    assert code == 0, stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["verification_after"]["fitness"] <= report["verification_before"]["fitness"]
    for layer in report["unmatched_layers"]:  # never silently: each one is in the report and was warned about
        assert layer["name"] in stderr or f"{len(report['unmatched_layers'])} weighted layer(s) are not refined" in stderr
    refined = read_ir(tmp_path / "refined.xml")
    assert refined.inputs[0].get_partial_shape().is_dynamic  # the user's graph, only weights changed
    reconstruct = report["stages"][0]["details"]
    assert reconstruct["layers"], "the reconstruct stage saw no layer"
    assert np.isfinite(report["verification_after"]["fitness"])
