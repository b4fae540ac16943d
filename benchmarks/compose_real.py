"""Does the compose stage add on top of the reconstruction when its data is real? One JSON line per
(model, data, seed).

For each zoo classifier, NNCF quantizes the FP32 IR as the quality table does (calibrated on 300 GAN images),
then refine runs ``ranges,reconstruct,compose`` twice on that start: with the zoo's 4,000 real training
digits as ``--data`` (shuffled; the pool and the verification images shrink to what there is), and with
the GAN's images. Recorded per run: the reconstruct and compose stages' own results on the verification
images and on the 1,000 held-out digits (KL), their ratios, what verification wrote, and the refine time.

    python benchmarks/compose_real.py > benchmarks/results/compose_real.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn,resnet18,mobilenet_v3_small,vit")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--seeds", default="0", help="compose search seeds, comma-separated")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stages import zoo_models, zoo_refine

    from evoquant import zoo
    from evoquant.data import Batch

    seeds = [int(seed) for seed in args.seeds.split(",")]
    for name, bits, built, model, spec, heldout in zoo_models("gan", args.models, args.bits, "evoquant-compose-real-"):
        x_train, y_train, _, _ = zoo.mnist_split(heldout[0].shape[1:])
        order = np.random.default_rng(8).permutation(len(x_train))
        for data_name, data in (("real", Batch(x_train[order], y_train[order])), ("gan", spec)):
            for seed in seeds:
                result = zoo_refine(model, built, data, heldout, seed=seed, stages="ranges,reconstruct,compose")
                stage = {s.name: s for s in result.stages}
                print(json.dumps({"benchmark": "compose_real", "model": name, "weight_bits": bits, "data": data_name, "seed": seed,
                                  "heldout_reconstruct": stage["reconstruct"].heldout.kl, "heldout_compose": stage["compose"].heldout.kl,
                                  "verification_reconstruct": stage["reconstruct"].verification.kl, "verification_compose": stage["compose"].verification.kl,
                                  "ratio_heldout": stage["compose"].heldout.kl / stage["reconstruct"].heldout.kl,
                                  "ratio_verification": stage["compose"].verification.kl / stage["reconstruct"].verification.kl,
                                  "chosen_stage": result.chosen_stage, "refine_seconds": round(result.wall_seconds - result.heldout_seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
