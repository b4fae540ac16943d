"""Which search settings help? One JSON line per (model, variant): held-out KL and accuracy after refine.

    python benchmarks/ablation.py --variants tie=0,tie=0.5 --models bn_cnn,residual_cnn
    python benchmarks/ablation.py --variants fraction=0.003,fraction=0.01,fraction=0.03

A variant is comma-free ``key=value`` (several joined with '+'), keys: tie (tie_probability), fraction
(mutation_fraction), adapt (adapt_mutation, 0/1), crossover (crossover_probability), mu, lambda, generations, data (a source spec),
size (selection_size), vsize (verification_size), pool (selection_pool),
imp (importance), engine (plain|suffix), groups (offspring_groups), seed. Fitness data is synthetic; held-out real digits only score the result.
"""

from __future__ import annotations

import argparse
import json
import sys

KEYS = {"tie": ("search", "tie_probability", float), "fraction": ("search", "mutation_fraction", float), "adapt": ("search", "adapt_mutation", lambda v: v in ("1", "true", "yes")), "fmax": ("search", "mutation_fraction_max", float), "crossover": ("search", "crossover_probability", float), "mu": ("search", "mu", int), "lambda": ("search", "lambda_", int), "generations": ("search", "generations", int), "seed": ("search", "seed", int), "data": ("top", "data", str), "size": ("top", "selection_size", int), "vsize": ("top", "verification_size", int), "pool": ("top", "selection_pool", int), "imp": ("top", "importance", float), "engine": ("top", "engine", str), "groups": ("search", "offspring_groups", int)}


def parse_variant(text: str) -> tuple[dict, dict]:
    top, search = {}, {}
    for part in filter(None, text.split("+")):
        key, _, value = part.partition("=")
        where, field, kind = KEYS[key]
        (search if where == "search" else top)[field] = kind(value)
    return top, search


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--variants", required=True, help="comma-separated variants, e.g. tie=0,tie=0.5")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--source", choices=["gan", "fractal"], default="fractal", help="synthetic calibration and fitness data")
    args = parser.parse_args()

    from evoquant import zoo
    from evoquant.api import refine
    from evoquant.config import RefineConfig
    from evoquant.demo import calibration_images, resolve_models, synthetic_source

    _, _, x_heldout, y_heldout = zoo.mnist_split()
    spec = synthetic_source(args.source, progress=False, echo=lambda *_: None)
    calibration = calibration_images(spec)
    base = RefineConfig.from_yaml(args.preset).replace(progress=False, data=spec)
    for name in resolve_models(args.models):
        built = zoo.build(name, calibration=calibration)
        for variant in args.variants.split(","):
            top, search = parse_variant(variant)
            config = base.replace(search=search, **top)
            result = refine(built.int8_xml, reference=built.fp32_xml, heldout=(x_heldout, y_heldout), config=config)
            before, after = result.heldout_before, result.heldout_after
            print(json.dumps({
                "benchmark": "ablation", "model": name, "variant": variant, "source": args.source,
                "heldout_kl_int8": before.kl, "heldout_kl_refined": after.kl,
                "heldout_mse_int8": before.mse, "heldout_mse_refined": after.mse,
                "heldout_acc_int8": before.accuracy, "heldout_acc_refined": after.accuracy,
                "verification_kl_int8": result.verification_before.kl, "verification_kl_refined": result.verification_after.kl,
                "selection_before": result.selection_before, "selection_after": result.selection_after,
                "selection_images": result.selection_images, "selection_effective_size": result.selection_effective_size,
                "improved": result.improved, "shifted_weights": result.shifted_weights,
                "evaluations": result.evaluations, "wall_seconds": round(result.wall_seconds, 1),
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
