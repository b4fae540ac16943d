"""What each refine stage buys, on the zoo at W8A8 and W4A8: one JSON line per (model, bits, stages, seed).

For each zoo model: NNCF quantizes the FP32 IR (calibrated on 300 synthetic images; W4A8 through
``evoquant.quantize(weight_bits=4)``), then refine runs with ``--stages evolve`` (the search alone, the
previous default), ``reconstruct`` (layer-wise alone) and ``reconstruct,evolve`` (the default), on the same
synthetic source only. Held-out: 1,000 real MNIST digits never used for calibration or selection.

    python benchmarks/stages.py --source fractal > benchmarks/results/stages.jsonl
    python benchmarks/stages.py --models residual_cnn --bits 4 --seeds 0,1,2
    python benchmarks/readme_table.py stages benchmarks/results/stages.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

STAGE_SETS = ("evolve", "reconstruct", "reconstruct,evolve")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--bits", default="8,4", help="weight bits to run, comma-separated")
    parser.add_argument("--stages", default=";".join(STAGE_SETS), help="stage sets separated by ';'")
    parser.add_argument("--seeds", default="0", help="search seeds (the reconstruction alone is deterministic: run once)")
    parser.add_argument("--source", choices=["gan", "fractal"], default="fractal")
    parser.add_argument("--preset", default="default")
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant import quantize, refine, zoo
    from evoquant.demo import CALIBRATION_SIZE, calibration_images, resolve_models, synthetic_source

    spec = synthetic_source(args.source, progress=False, echo=lambda *_: None)
    calibration = calibration_images(spec)
    _, _, x_heldout, y_heldout = zoo.mnist_split()
    work = Path(tempfile.mkdtemp(prefix="evoquant-stages-"))
    for name in resolve_models(args.models):
        built = zoo.build(name, calibration=calibration)
        for bits in (int(b) for b in args.bits.split(",")):
            model = built.int8_xml
            if bits == 4:
                model = work / f"{name}_w4a8.xml"
                quantize(built.fp32_xml, calibration=calibration[:CALIBRATION_SIZE], output=model, weight_bits=4)
            for stages in args.stages.split(";"):
                seeds = [0] if "evolve" not in stages else [int(s) for s in args.seeds.split(",")]
                for seed in seeds:
                    started = time.perf_counter()
                    result = refine(model, reference=built.fp32_xml, data=spec, heldout=(x_heldout, y_heldout), stages=stages, preset=args.preset,
                                    seed=seed, progress=False)
                    row = {
                        "benchmark": "stages", "model": name, "weight_bits": bits, "stages": stages, "seed": seed, "source": args.source,
                        "preset": args.preset, "chosen_stage": result.chosen_stage, "evaluations": result.evaluations,
                        "wall_seconds": round(time.perf_counter() - started, 1),
                        "stage_seconds": {stage.name: round(stage.seconds, 1) for stage in result.stages},
                        "stage_verification_fitness": {stage.name: stage.verification.fitness for stage in result.stages},
                        "verification_fitness_start": result.verification_before.fitness,
                        "openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__,
                    }
                    for label, metrics in (("fp32", result.heldout_reference), ("int8", result.heldout_before), ("refined", result.heldout_after)):
                        row[f"{label}_accuracy"] = metrics.accuracy
                        row[f"{label}_kl"] = metrics.kl
                        row[f"{label}_mse"] = metrics.mse
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
