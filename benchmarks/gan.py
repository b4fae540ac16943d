"""GAN quality on the zoo's MNIST split: training time and class-correctness, one JSON line per run.

Trains the compact conditional GAN on the zoo's 4,000 training digits (or reuses ``--out`` with
``--resume``), then classifies generated images with the zoo's FP32 ``bn_cnn`` IR and reports how often
the classifier agrees with the label the generator was asked for (class-correctness), plus the same
classifier's accuracy on the 1,000 real held-out digits for scale. Optionally distills the trained
generator into a smaller student (``--distill-out``) and scores the student the same way. Run:

    python benchmarks/gan.py --out /tmp/gan-mnist --steps 3000 --threads 2
    python benchmarks/gan.py --out /tmp/gan-mnist --steps 3000 --distill-out /tmp/gan-student --distill-steps 1500
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def class_correctness(generator_dir: str, classifier_xml: str, n: int, seed: int = 0) -> float:
    """Share of ``n`` generated images (balanced labels) that the classifier assigns to their label."""
    import numpy as np

    from evoquant.data import load_source
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    batch = load_source(f"gan:{generator_dir}").sample(n, (1, 28, 28), seed=seed)
    logits = infer(compile_ir(read_ir(classifier_xml), f32=True), batch.images)[0]
    return float(np.mean(logits.argmax(1) == batch.labels))


def diversity_ratio(generator_dir: str, x_real, y_real, per_class: int = 100, seed: int = 0) -> float:
    """Mean over classes of (mean pairwise L2 distance of generated images of the class) divided by the
    same for real images of the class: 1.0 is as varied as the data, near 0 is a collapsed generator."""
    import numpy as np

    from evoquant.gan import load_generator

    generator = load_generator(generator_dir)
    rng = np.random.default_rng(seed)

    def spread(images):
        flat = images.reshape(len(images), -1).astype(np.float64)
        squared = (flat * flat).sum(1)
        distances = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2 * flat @ flat.T, 0))
        return distances[np.triu_indices(len(flat), 1)].mean()

    ratios = []
    for label in range(generator.info.num_classes):
        z = rng.standard_normal((per_class, generator.info.latent_size), dtype=np.float32)
        fake = generator.images01(z, np.full(per_class, label))
        real = x_real[y_real == label][:per_class]
        ratios.append(spread(fake) / spread(real))
    return float(np.mean(ratios))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/evoquant-gan-mnist", help="generator directory")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generator-width", type=int, default=None)
    parser.add_argument("--discriminator-width", type=int, default=None)
    parser.add_argument("--mode-seeking", type=float, default=None, help="mode-seeking weight (default: train_gan's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--samples", type=int, default=1000, help="generated images classified")
    parser.add_argument("--distill-out", default=None, help="also distill the trained generator into this directory")
    parser.add_argument("--distill-steps", type=int, default=1500)
    parser.add_argument("--distill-width", type=int, default=16, help="student generator width")
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from evoquant import zoo
    from evoquant.demo import calibration_images
    from evoquant.gan import distill, train_gan
    from evoquant.gan.train import DEFAULT_DISCRIMINATOR_WIDTH, DEFAULT_GENERATOR_WIDTH
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    x_train, y_train, x_heldout, y_heldout = zoo.mnist_split()
    classifier = zoo.build("bn_cnn", calibration=calibration_images())
    real_accuracy = float((infer(compile_ir(read_ir(classifier.fp32_xml), f32=True), x_heldout)[0].argmax(1) == y_heldout).mean())

    widths = {"generator_width": args.generator_width or DEFAULT_GENERATOR_WIDTH,
              "discriminator_width": args.discriminator_width or DEFAULT_DISCRIMINATOR_WIDTH}
    if args.mode_seeking is not None:
        widths["mode_seeking_weight"] = args.mode_seeking
    started = time.perf_counter()
    result = train_gan(x_train, y_train, out_dir=args.out, steps=args.steps, batch_size=args.batch_size, resume=args.resume,
                       overwrite=not args.resume, progress=sys.stderr.isatty(), **widths)
    row = {
        "benchmark": "gan",
        "kind": "train",
        "out": args.out,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train_seconds": round(result.seconds, 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        **widths,
        "class_correctness_bn_cnn": class_correctness(args.out, str(classifier.fp32_xml), args.samples),
        "samples": args.samples,
        "diversity_ratio": diversity_ratio(args.out, x_train, y_train),
        "bn_cnn_real_heldout_accuracy": real_accuracy,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    print(json.dumps(row), flush=True)

    if args.distill_out:
        started = time.perf_counter()
        student = distill(args.out, out_dir=args.distill_out, steps=args.distill_steps, overwrite=True, progress=sys.stderr.isatty(),
                          generator_width=args.distill_width, discriminator_width=widths["discriminator_width"])
        row = {
            "benchmark": "gan",
            "kind": "distill",
            "teacher": args.out,
            "out": args.distill_out,
            "steps": student.steps,
            "train_seconds": round(student.seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 1),
            "threads": torch.get_num_threads(),
            "generator_width": args.distill_width,
            "class_correctness_bn_cnn": class_correctness(args.distill_out, str(classifier.fp32_xml), args.samples),
            "samples": args.samples,
            "diversity_ratio": diversity_ratio(args.distill_out, x_train, y_train),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
