"""The losses of data-free synthesis: BatchNorm statistics (ZeroQ, GDFQ), Qimera's superposed classes,
ClusterQ's per-class centroids and diversity.

Everything here is plain torch on the :class:`~evoquant.dfq.teacher.BNStatistics` a
:class:`~evoquant.dfq.teacher.Teacher` records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evoquant.gan.models import import_torch


def bns_loss(stats: list, *, std: bool = False, relative: bool = False) -> Any:
    """Mean over layers of the squared distance between the batch's and the running statistics, per channel:
    mean and variance (GDFQ), or mean and standard deviation (``std=True``, ZeroQ).

    ``relative``: each channel's squared errors divided by its running variance (with ``std``, the mean's and
    the standard deviation's errors in units of the running standard deviation; without, the variance's in
    units of the running variance), so that every channel counts alike. The absolute form lets channels of
    small variance drift: Genie's images with it miss the real digits' per-channel statistics 3-5x more
    than real images do (docs/datafree.md)."""
    torch = import_torch()
    total = 0.0
    for layer in stats:
        scale = layer.running_var + 1e-5 if relative else 1.0
        if std:
            spread = torch.sqrt(layer.var + 1e-5) - torch.sqrt(layer.running_var + 1e-5)
            spread_scale = scale
        else:
            spread = layer.var - layer.running_var
            spread_scale = scale**2 if relative else 1.0
        total = total + torch.mean((layer.mean - layer.running_mean) ** 2 / scale) + torch.mean(spread**2 / spread_scale)
    return total / max(1, len(stats))


# --------------------------------------------------------------------------------------------------
# Qimera: boundary-supporting samples
# --------------------------------------------------------------------------------------------------


@dataclass
class Superposition:
    """A batch's classes: per sample ``k`` class indices and their coefficients (summing to 1), and the
    soft target over all classes. Plain samples have one class with coefficient 1 (the rest 0)."""

    classes: Any  # (B, k) long
    coefficients: Any  # (B, k) float, rows sum to 1
    targets: Any  # (B, num_classes) float, rows sum to 1
    mixed: Any  # (B,) bool


def superpose(batch_size: int, num_classes: int, *, probability: float, k: int, generator: Any) -> Superposition:
    """Qimera's draw: with ``probability`` a sample superposes ``k`` distinct classes with softmax(randn)
    coefficients and takes the matching soft label; otherwise it is one class."""
    torch = import_torch()
    k = max(1, min(k, num_classes))
    classes = torch.stack([torch.randperm(num_classes, generator=generator)[:k] for _ in range(batch_size)])
    coefficients = torch.softmax(torch.randn(batch_size, k, generator=generator), dim=1)
    mixed = torch.rand(batch_size, generator=generator) < probability
    plain = torch.zeros(batch_size, k)
    plain[:, 0] = 1.0
    coefficients = torch.where(mixed[:, None], coefficients, plain)
    targets = torch.zeros(batch_size, num_classes).scatter_add_(1, classes, coefficients)
    return Superposition(classes, coefficients, targets, mixed)


def soft_cross_entropy(logits: Any, targets: Any) -> Any:
    torch = import_torch()
    return -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()


# --------------------------------------------------------------------------------------------------
# ClusterQ: per-class centroids of the deeper layers' statistics
# --------------------------------------------------------------------------------------------------


@dataclass
class ClassCentroids:
    """Per class and per observed BatchNorm layer (the deeper half), the centroid of the feature statistics
    (per-channel mean and variance) of generated samples the teacher classifies correctly, updated as an
    exponential moving average: ``centroid ← decay · centroid + (1 − decay) · batch statistic``.

    A centroid starts *empty* and is set by the first correct samples of its class: it is never filled
    from the layer's global running statistics (with those, the per-class loss would equal the plain BNS
    loss: the defect of ClusterQ's public code).
    """

    num_classes: int
    layers: list[int]  # indices into the teacher's BatchNorm list
    decay: float = 0.2
    mean: dict = field(default_factory=dict)  # layer -> (classes, C)
    var: dict = field(default_factory=dict)
    filled: dict = field(default_factory=dict)  # layer -> (classes,) bool

    @classmethod
    def deeper_half(cls, num_classes: int, layers: int, decay: float = 0.2) -> "ClassCentroids":
        return cls(num_classes, list(range(layers // 2, layers)), decay)

    def update(self, stats: list, labels: Any, correct: Any) -> None:
        """Fold in the statistics of this batch's correctly classified samples, class by class."""
        torch = import_torch()
        with torch.no_grad():
            for layer in self.layers:
                features = stats[layer].features.detach()
                channels = features.shape[1]
                if layer not in self.mean:
                    self.mean[layer] = torch.zeros(self.num_classes, channels)
                    self.var[layer] = torch.zeros(self.num_classes, channels)
                    self.filled[layer] = torch.zeros(self.num_classes, dtype=torch.bool)
                for c in torch.unique(labels[correct]).tolist():
                    members = features[(labels == c) & correct]
                    dims = [0] + list(range(2, members.ndim))
                    mean, var = members.mean(dim=dims), members.var(dim=dims, unbiased=False)
                    if self.filled[layer][c]:
                        self.mean[layer][c] = self.decay * self.mean[layer][c] + (1 - self.decay) * mean
                        self.var[layer][c] = self.decay * self.var[layer][c] + (1 - self.decay) * var
                    else:
                        self.mean[layer][c], self.var[layer][c] = mean, var
                        self.filled[layer][c] = True

    def loss(self, stats: list, labels: Any, *, diversity: float = 0.0, generator: Any = None) -> Any:
        """Mean over layers and classes present (with a centroid) of the squared distance between the class's
        batch statistics and its centroid. With ``diversity`` > 0 the *target* is perturbed, ``centroid mean
        + diversity · ε · centroid std`` (ε ~ N(0, 1), drawn independently of the batch), so the term pushes
        the batch somewhere near the centroid rather than onto it; the perturbation is not applied to the
        batch's own statistics (shifting both would cancel: zero gradient, the public code's second defect)."""
        torch = import_torch()
        terms = []
        for layer in self.layers:
            if layer not in self.mean:
                continue
            features = stats[layer].features
            for c in torch.unique(labels).tolist():
                if not self.filled[layer][c]:
                    continue
                members = features[labels == c]
                dims = [0] + list(range(2, members.ndim))
                mean, var = members.mean(dim=dims), members.var(dim=dims, unbiased=False)
                target_mean, target_var = self.mean[layer][c], self.var[layer][c]
                if diversity > 0:
                    noise = torch.randn(target_mean.shape, generator=generator)
                    target_mean = target_mean + diversity * noise * torch.sqrt(target_var + 1e-5)
                terms.append(torch.mean((mean - target_mean) ** 2) + torch.mean((var - target_var) ** 2))
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).mean()

    def state_dict(self) -> dict:
        return {"mean": self.mean, "var": self.var, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var, self.filled = dict(state["mean"]), dict(state["var"]), dict(state["filled"])
