"""Refinement quality on the zoo: one JSON line per model.

For each zoo model: held-out accuracy, top-1 agreement and KL(FP32‖INT8) (normalized MSE for the
autoencoder) of the FP32 IR, NNCF's INT8 IR (calibrated on synthetic GAN or fractal images) and the refined IR
(refined on the same synthetic source only), plus evaluations and wall time. Held-out real digits are never
used to select. Run:

    python benchmarks/quality.py                     # all zoo models, default preset
    python benchmarks/quality.py --models bn_cnn --preset fast
    python benchmarks/quality.py > results/quality.jsonl && python benchmarks/readme_table.py quality results/quality.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--source", choices=["gan", "fractal"], default="gan", help="synthetic calibration and fitness data, as in the demo")
    parser.add_argument("--data", default=None, help="override the fitness data spec only")
    parser.add_argument("--jobs", type=int, default=None)
    parser.add_argument("--output-dir", default="/tmp/evoquant-quality")
    args = parser.parse_args()

    import openvino
    import nncf

    from evoquant.demo import run_demo

    from evoquant.config import RefineConfig

    config = RefineConfig.from_yaml(args.preset)
    results = run_demo(models=args.models, preset=args.preset, source=args.source, data=args.data, jobs=args.jobs, output_dir=args.output_dir, progress=False, echo=lambda *_: None)
    for name, result in results.items():
        row = {
            "benchmark": "quality",
            "model": name,
            "preset": args.preset,
            "source": args.source,
            "data": result.data,
            "objective": result.objective,
            "improved": result.improved,
            "evaluations": result.evaluations,
            "generations": result.generations,
            "shifted_weights": result.shifted_weights,
            "total_weights": result.total_weights,
            "selection_size": config.selection_size,
            "selection_pool": config.selection_pool if config.importance > 0 else None,
            "verification_size": config.verification_size,
            "selection_images": result.selection_images,
            "selection_effective_size": result.selection_effective_size,
            "search_seconds": round(result.search_seconds, 2),
            "wall_seconds": round(result.wall_seconds, 2),
            "openvino": openvino.__version__.split("-")[0],
            "nncf": nncf.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        }
        for label, metrics in (("fp32", result.heldout_reference), ("int8", result.heldout_before), ("refined", result.heldout_after)):
            row[f"{label}_accuracy"] = metrics.accuracy
            row[f"{label}_agreement"] = metrics.agreement
            row[f"{label}_kl"] = metrics.kl
            row[f"{label}_mse"] = metrics.mse
        row["verification_kl_int8"] = result.verification_before.kl
        row["verification_kl_refined"] = result.verification_after.kl
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
