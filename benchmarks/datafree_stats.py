"""What a data source's images look like to the FP32 model: BatchNorm statistics and simple image statistics.

For a zoo classifier with BatchNorm, 512 images from each source — real training digits (a seeded draw),
the zoo's GAN, fractals, and each data-free method variant given (made or taken from the cache as
``benchmarks/calibration.py --datafree`` does) — are run through the FP32 program. One JSON line per
source: the BNS loss the generators train on (per layer: squared error of the batch's channel means and
variances against the running statistics, mean over channels), its mean and variance parts, the teacher's
mean top-1 confidence, and the images' mean pixel, mean squared pixel, total variation and share of
pixels above 0.5; and how *distinct* the images are (:func:`diversity`): the effective number of pixel
dimensions they spread over, each image's distance to its nearest neighbour relative to the typical
distance, and the typical distance within consecutive 64-image batches (what Genie fits jointly) relative
to the typical distance across them; and how close they lie to real digits (:func:`closeness`: pixel
distances to and from the 1,000 held-out digits); and ``correlation_error``, how far the correlations
between each BatchNorm layer's input channels (which the BatchNorm statistics do not hold) lie from those
of 512 held-out digits (:func:`correlation_error`); and ``relative_mismatch``, per BatchNorm layer, the
median over channels of ``(|mean - running mean| + |std - running std|) / running std``: how far the
images' statistics lie from the stored ones in units of each channel's spread, which the absolute BNS loss
does not see for narrow channels (:func:`relative_mismatch`; real digits: the floor).

    python benchmarks/datafree_stats.py --models bn_cnn --datafree clusterq,gdfq,clusterq:width=32 \\
        > benchmarks/results/datafree_stats.jsonl
    python benchmarks/datafree_stats.py --models bn_cnn,dw_separable_cnn --datafree genie:seed=0,genie:seed=0,bns=relative \\
        > benchmarks/results/datafree_stats_relative.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

IMAGES = 512
BATCH = 64  # Genie and ZeroQ fit each batch of 64 jointly; the .npz keeps the batches in order


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    square_a, square_b = np.square(a).sum(axis=1), np.square(b).sum(axis=1)
    return np.sqrt(np.clip(square_a[:, None] + square_b[None, :] - 2 * a @ b.T, 0, None))


def closeness(images: np.ndarray, reference: np.ndarray) -> dict:
    """Pixel L2 distances between ``images`` and real ``reference`` images: ``to_real``, the median distance
    from an image to its nearest real one (do the images look like digits?); ``from_real``, the median
    distance from a real image to its nearest image (are the digits covered?)."""
    distance = _distances(np.asarray(images, dtype=np.float64).reshape(len(images), -1), np.asarray(reference, dtype=np.float64).reshape(len(reference), -1))
    return {"to_real": float(np.median(distance.min(axis=1))), "from_real": float(np.median(distance.min(axis=0)))}


def channel_correlations(stats) -> list[np.ndarray]:
    """Per BatchNorm layer, the correlation between its input channels over images and positions: what the
    BatchNorm statistics (each channel's mean and variance alone) leave free, and what the next layer's
    reconstruction fits on (its inputs' Gram matrix)."""
    matrices = []
    for layer in stats:
        features = layer.features.detach().numpy()
        flat = np.moveaxis(features, 1, -1).reshape(-1, features.shape[1]).astype(np.float64)
        matrices.append(np.nan_to_num(np.corrcoef(flat, rowvar=False)))
    return matrices


def correlation_error(matrices: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """The relative Frobenius error of the off-diagonal channel correlations against ``reference``'s, mean over
    the layers."""
    errors = []
    for mine, real in zip(matrices, reference):
        off = ~np.eye(len(real), dtype=bool)
        errors.append(float(np.linalg.norm((mine - real)[off]) / max(np.linalg.norm(real[off]), 1e-12)))
    return float(np.mean(errors))


def relative_mismatch(stats) -> list[float]:
    """Per BatchNorm layer: the median over channels of the batch statistics' distance from the running ones in
    units of the channel's running standard deviation (mean error plus standard-deviation error)."""
    values = []
    for layer in stats:
        spread = np.sqrt(layer.running_var.numpy() + 1e-5)
        error = np.abs(layer.mean.numpy() - layer.running_mean.numpy()) + np.abs(np.sqrt(layer.var.numpy() + 1e-5) - spread)
        values.append(float(np.median(error / spread)))
    return values


def diversity(images: np.ndarray, batch: int = BATCH) -> dict:
    """How distinct ``images`` are, in pixel space: ``effective_dims``, the participation ratio of the
    covariance's eigenvalues ((Σλ)² / Σλ²: 1 if every image differs along one direction); ``nearest_ratio``,
    the median distance to the nearest other image over the median distance between two images (0 for
    duplicates, ~1 for isotropic noise); ``within_batch_ratio``, the median distance between two images of
    the same consecutive ``batch`` over that between images of different batches (1 for independent draws,
    below 1 if a batch's images resemble each other)."""
    x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x, rowvar=False)), 0, None)
    distance = _distances(x, x)
    pairs = ~np.eye(len(x), dtype=bool)
    typical = float(np.median(distance[pairs]))
    nearest = np.where(pairs, distance, np.inf).min(axis=1)
    group = np.arange(len(x)) // batch
    same = (group[:, None] == group[None, :]) & pairs
    within = float(np.median(distance[same]) / np.median(distance[group[:, None] != group[None, :]])) if group.max() > 0 else None
    return {"effective_dims": float(eigenvalues.sum() ** 2 / max(np.square(eigenvalues).sum(), 1e-30)),
            "nearest_ratio": float(np.median(nearest) / typical), "within_batch_ratio": within}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn")
    parser.add_argument("--datafree", default="clusterq,gdfq", help="data-free methods (with options, as in calibration.py)")
    args = parser.parse_args(argv)

    from calibration import split_methods
    from quality import zoo_instance

    from evoquant import zoo
    from evoquant.data import load_source
    from evoquant.demo import calibration_images, data_free_source, synthetic_source
    from evoquant.dfq import load_teacher
    from evoquant.dfq.losses import bns_loss
    from evoquant.dfq.synthesis import image_prior
    from evoquant.gan.models import import_torch

    torch = import_torch()
    quiet = {"progress": False, "echo": lambda *_: None}
    for name in (n.strip() for n in args.models.split(",")):
        shape = zoo.input_shape_of(name)
        gan = synthetic_source("gan", shape=shape, **quiet)  # the zoo GAN at the model's image size, as the other benchmarks use
        built = zoo.build(name, calibration=calibration_images(gan, shape=shape))
        instance = zoo_instance(built.fp32_xml)  # which zoo model the rows score: hashed once per model
        teacher = load_teacher(built.fp32_program)
        x_train, _, x_heldout, _ = zoo.mnist_split(shape)
        sources = {"real": x_train[np.random.default_rng(0).permutation(len(x_train))[:IMAGES]]}
        sources["gan"] = load_source(gan).sample(IMAGES, shape, seed=0).images
        sources["fractal"] = load_source("fractal").sample(IMAGES, shape, seed=0).images
        for method in split_methods(args.datafree):
            spec = data_free_source(built, method, progress=False, echo=lambda *_: None)
            sources[method] = load_source(spec).sample(IMAGES, shape, seed=0).images if spec.startswith("gan:") else np.load(spec)["x"][:IMAGES]
        with torch.no_grad():
            _, real_stats = teacher(torch.as_tensor(np.ascontiguousarray(x_heldout[:IMAGES], dtype=np.float32).reshape(-1, *shape)))
        held_out_correlations = channel_correlations(real_stats)
        for source, images in sources.items():
            x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32).reshape(-1, *shape))
            with torch.no_grad():
                logits, stats = teacher(x)
            means = [float(torch.mean((layer.mean - layer.running_mean) ** 2)) for layer in stats]
            variances = [float(torch.mean((layer.var - layer.running_var) ** 2)) for layer in stats]
            print(json.dumps({
                "benchmark": "datafree_stats", "model": name, "source": source, "images": len(x), **instance,
                "bns": float(bns_loss(stats)), "bns_mean_part": means, "bns_var_part": variances,
                "confidence": float(torch.softmax(logits, dim=1).max(dim=1).values.mean()),
                "pixel_mean": float(x.mean()), "pixel_square": float(image_prior(x, tv_weight=0.0, l2_weight=1.0)),
                "total_variation": float(image_prior(x, tv_weight=1.0, l2_weight=0.0)),
                "bright_share": float((x > 0.5).float().mean()),
                **diversity(images), **closeness(images, x_heldout),
                "correlation_error": correlation_error(channel_correlations(stats), held_out_correlations),
                "relative_mismatch": relative_mismatch(stats),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
