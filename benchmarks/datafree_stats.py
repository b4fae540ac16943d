"""What a data source's images look like to the FP32 model: BatchNorm statistics and simple image statistics.

For a zoo classifier with BatchNorm, 512 images from each source — real training digits (a seeded draw),
the zoo's GAN, and each data-free method variant given (made or taken from the cache as
``benchmarks/calibration.py --datafree`` does) — are run through the FP32 program. One JSON line per
source: the BNS loss the generators train on (per layer: squared error of the batch's channel means and
variances against the running statistics, mean over channels), its mean and variance parts, the teacher's
mean top-1 confidence, and the images' mean pixel, mean squared pixel, total variation and share of
pixels above 0.5.

    python benchmarks/datafree_stats.py --models bn_cnn --datafree clusterq,gdfq,clusterq:width=32 \\
        > benchmarks/results/datafree_stats.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

IMAGES = 512


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn")
    parser.add_argument("--datafree", default="clusterq,gdfq", help="data-free methods (with options, as in calibration.py)")
    args = parser.parse_args(argv)

    from calibration import split_methods

    from evoquant import zoo
    from evoquant.data import load_source
    from evoquant.demo import calibration_images, data_free_source
    from evoquant.dfq import load_teacher
    from evoquant.dfq.losses import bns_loss
    from evoquant.dfq.synthesis import image_prior
    from evoquant.gan.models import import_torch

    torch = import_torch()
    x_train, _, _, _ = zoo.mnist_split()
    for name in (n.strip() for n in args.models.split(",")):
        built = zoo.build(name, calibration=calibration_images())
        teacher = load_teacher(built.fp32_program)
        shape = tuple(teacher.input_shape)
        sources = {"real": x_train[np.random.default_rng(0).permutation(len(x_train))[:IMAGES]]}
        sources["gan"] = load_source(f"gan:{zoo.build_gan()}").sample(IMAGES, shape, seed=0).images
        for method in split_methods(args.datafree):
            spec = data_free_source(built, method, progress=False, echo=lambda *_: None)
            sources[method] = load_source(spec).sample(IMAGES, shape, seed=0).images if spec.startswith("gan:") else np.load(spec)["x"][:IMAGES]
        for source, images in sources.items():
            x = torch.as_tensor(np.ascontiguousarray(images, dtype=np.float32).reshape(-1, *shape))
            with torch.no_grad():
                logits, stats = teacher(x)
            means = [float(torch.mean((layer.mean - layer.running_mean) ** 2)) for layer in stats]
            variances = [float(torch.mean((layer.var - layer.running_var) ** 2)) for layer in stats]
            print(json.dumps({
                "benchmark": "datafree_stats", "model": name, "source": source, "images": len(x),
                "bns": float(bns_loss(stats)), "bns_mean_part": means, "bns_var_part": variances,
                "confidence": float(torch.softmax(logits, dim=1).max(dim=1).values.mean()),
                "pixel_mean": float(x.mean()), "pixel_square": float(image_prior(x, tv_weight=0.0, l2_weight=1.0)),
                "total_variation": float(image_prior(x, tv_weight=1.0, l2_weight=0.0)),
                "bright_share": float((x > 0.5).float().mean()),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
