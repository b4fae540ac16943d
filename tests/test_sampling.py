"""Importance-sampled selection: the sampler, weighted built-in objectives, and refine drawing by importance."""

from __future__ import annotations

import numpy as np
import pytest

import evoquant
from evoquant.errors import EvoquantError
from evoquant.fitness.objectives import OBJECTIVES, kl_to_teacher, log_softmax, normalized_mse
from evoquant.fitness.sampling import effective_size, importance_sample

from test_refine import SMALL


def heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    """Per-image losses shaped like a quantized classifier's KL: most tiny, a few large."""
    rng = np.random.default_rng(seed)
    return rng.lognormal(mean=-7.0, sigma=2.0, size=n)


def test_sampler_returns_distinct_images_with_mean_one_weights():
    indices, weights = importance_sample(heavy_tailed(4096), 512, 0.7, seed=1)
    assert len(np.unique(indices)) == len(indices) <= 512
    assert indices.min() >= 0 and indices.max() < 4096
    assert weights.shape == indices.shape and np.all(weights > 0)
    assert weights.mean() == pytest.approx(1.0)


def test_sampler_prefers_the_images_that_carry_the_loss():
    terms = heavy_tailed(4096)
    top = set(np.argsort(terms)[-41:].tolist())  # the top 1 %
    indices, _ = importance_sample(terms, 256, 0.7, seed=2)
    uniform, _ = importance_sample(terms, 256, 0.0, seed=2)
    assert len(top & set(indices.tolist())) > 20  # a uniform draw expects 2.6 of them
    assert len(top & set(uniform.tolist())) < 10


def test_weighted_estimate_of_the_pool_mean_has_lower_error_than_a_uniform_batch():
    errors = {0.0: [], 0.7: []}
    for seed in range(40):
        terms = heavy_tailed(4096, seed)
        truth = terms.mean()
        for share in errors:
            indices, weights = importance_sample(terms, 256, share, seed=100 + seed)
            errors[share].append(abs(np.average(terms[indices], weights=weights) / truth - 1))
    assert np.median(errors[0.7]) < 0.5 * np.median(errors[0.0])
    assert np.median(errors[0.7]) < 0.1


def test_share_zero_or_flat_losses_give_uniform_weights():
    _, weights = importance_sample(np.zeros(100), 50, 0.7, seed=0)
    np.testing.assert_allclose(weights[weights == weights.min()], 1.0 * weights.min())
    _, weights = importance_sample(heavy_tailed(100), 50, 0.0, seed=0)
    assert np.ptp(weights / np.round(weights / weights.min())) < 1e-9  # only repeat counts differ
    with pytest.raises(ValueError):
        importance_sample(np.ones(10), 5, 1.5, seed=0)


def test_effective_size():
    assert effective_size(np.ones(10)) == pytest.approx(10)
    assert effective_size(np.array([1.0, 0.0, 0.0])) == pytest.approx(1)


def test_weighted_objectives_are_weighted_means_and_unweighted_calls_are_unchanged():
    rng = np.random.default_rng(0)
    teacher, outputs = [rng.normal(size=(6, 10))], [rng.normal(size=(6, 10))]
    log_p, log_q = log_softmax(teacher[0]), log_softmax(outputs[0])
    per_image = np.sum(np.exp(log_p) * (log_p - log_q), axis=1)
    weights = np.array([1.0, 2.0, 0.5, 3.0, 1.0, 0.5])
    assert kl_to_teacher(outputs, teacher) == pytest.approx(per_image.mean())
    assert kl_to_teacher(outputs, teacher, None, weights=weights) == pytest.approx(np.average(per_image, weights=weights))
    error = np.sum((outputs[0] - teacher[0]) ** 2, axis=1)
    energy = np.sum(teacher[0] ** 2, axis=1)
    assert normalized_mse(outputs, teacher) == pytest.approx(error.sum() / energy.sum())
    assert normalized_mse(outputs, teacher, None, weights=weights) == pytest.approx(np.dot(weights, error) / np.dot(weights, energy))
    labels = np.arange(6) % 10
    assert OBJECTIVES["ce"](outputs, None, labels, weights=np.ones(6)) == pytest.approx(-np.mean(log_q[np.arange(6), labels]))
    with pytest.raises(EvoquantError, match="weights"):
        kl_to_teacher(outputs, teacher, None, weights=np.ones(3))


IMPORTANCE = SMALL.replace(selection_size=24, selection_pool=96, importance=0.7)  # the default path, small


def test_refine_scores_an_importance_drawn_selection_and_parallel_jobs_agree(tiny_irs, tmp_path):
    first = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data="fractal", output=tmp_path / "a.xml", config=IMPORTANCE)
    parallel = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data="fractal", output=tmp_path / "b.xml", config=IMPORTANCE.replace(jobs=2))
    assert 1 <= first.selection_images <= 24
    assert 1 <= first.selection_effective_size <= first.selection_images
    assert "drawn by importance" in first.table()
    assert [h.best for h in first.history] == [h.best for h in parallel.history]
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    plain = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data="fractal", config=SMALL.replace(selection_size=24, importance=0.0))
    assert plain.selection_images == 24 and plain.selection_effective_size is None
    assert plain.selection_before != first.selection_before  # other images, weighted


def test_hooks_get_the_plain_batch_and_finite_data_shrinks_the_pool(tiny_irs):
    def hook(outputs, teacher, labels):
        return float(np.mean((outputs[0] - teacher[0]) ** 2))

    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data="fractal", fitness=hook, config=IMPORTANCE)
    assert result.selection_images == 24 and result.selection_effective_size is None
    images = np.random.default_rng(0).random((70, 3, 8, 8), dtype=np.float32)  # fewer than pool + verification
    result = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=images, config=IMPORTANCE)
    assert result.selection_images <= 24
    with pytest.raises(EvoquantError, match="holds 40 images; refine needs 56 .24 to select, 32 to verify.: give more"):
        evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, data=images[:40], config=IMPORTANCE)


def test_bad_importance_settings_are_user_errors():
    with pytest.raises(EvoquantError, match="importance"):
        SMALL.replace(importance=2.0)
    with pytest.raises(EvoquantError, match="pool"):
        SMALL.replace(selection_pool=-1)
