"""Importance-sampled selection batches: the images that carry the loss, weighted to keep it unbiased.

Per-image losses of a quantized model are heavy-tailed: on the zoo's dw_separable_cnn with GAN images, the
top 1 % of images hold 49 % of the mean KL(FP32 ‖ INT8), so a uniform 256-image batch rests on two or three
images and the search fits them (selection KL -75 %, fresh images -29 %). Drawing the selection batch from a
large pool with probability mixing uniform and "proportional to the start model's loss", and weighting each
image by the inverse of that probability, estimates the pool's mean loss with far lower variance for the
same number of images; the search then optimizes what generalizes.
"""

from __future__ import annotations

import numpy as np


def importance_sample(terms: np.ndarray, n: int, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` of the pool's images with replacement and return (unique indices, weights).

    ``terms``: each pool image's loss under the start model (non-negative). The draw probability is
    ``(1 - share) / N + share * terms / terms.sum()``. Repeated draws are merged into one image whose weight
    counts them, so the batch has at most ``n`` distinct images. The weights (``count / (N p)``, scaled to
    mean 1) make the weighted mean over the batch a consistent estimate of the pool mean.
    """
    terms = np.clip(np.asarray(terms, dtype=np.float64), 0.0, None)
    size = len(terms)
    total = terms.sum()
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the importance share must be in [0, 1], got {share}")
    p = np.full(size, 1.0 / size)
    if total > 0 and np.isfinite(total):
        p = (1.0 - share) * p + share * terms / total
    draws = np.random.default_rng(seed).choice(size, size=n, replace=True, p=p)
    indices, counts = np.unique(draws, return_counts=True)
    weights = counts / (size * p[indices])
    return indices.astype(np.int64), weights / weights.mean()


def effective_size(weights: np.ndarray) -> float:
    """Kish's effective sample size of weighted images: (sum w)^2 / sum w^2."""
    w = np.asarray(weights, dtype=np.float64)
    return float(w.sum() ** 2 / max(float(np.dot(w, w)), 1e-300))
