"""The reconstruct stage's knobs, and the classic solvers, on the zoo: one JSON line per (model, bits, setting).

For each zoo classifier at W8A8 and W4A8 (NNCF calibrated on 300 images of the source), refine runs
``--stages reconstruct`` once per setting — a dict of ``ReconstructConfig`` fields (damping, max_shift,
solver: ``output`` is evoquant's, ``gptq``/``adaround`` the baselines in ``benchmarks/baselines/``) — on the
same synthetic images, and the reconstruction's own result is scored on 1,000 held-out real digits
(``stage_heldout_kl``: even where verification kept NNCF's model). Deterministic: no seeds.

    python benchmarks/reconstruct_knobs.py --source fractal > benchmarks/results/reconstruct_knobs.jsonl
    python benchmarks/reconstruct_knobs.py --source gan >> benchmarks/results/reconstruct_knobs.jsonl
    python benchmarks/readme_table.py reconstruct_knobs benchmarks/results/reconstruct_knobs.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

SETTINGS = [
    {"damping": 0.01, "max_shift": 1},  # the default
    {"damping": 0.01, "max_shift": 2},
    {"damping": 0.01, "max_shift": None},
    {"damping": 0.03, "max_shift": None},
    {"damping": 0.1, "max_shift": 1},
    {"damping": 0.1, "max_shift": None},
    {"damping": 0.3, "max_shift": 1},
    {"damping": 0.3, "max_shift": None},
    {"damping": 1.0, "max_shift": None},
    {"solver": "gptq", "max_shift": None},
    {"solver": "adaround", "max_shift": None},
    {"solver": "lower-of-output-adaround", "max_shift": None},
]


def lower_of_output_adaround(problem):
    """An experiment, not a baseline: per layer (group), evoquant's solve or AdaRound's, whichever leaves
    the lower error on the layer's own calibration rows. Does the layer error pick the one that generalises?"""
    from baselines.adaround import adaround_solver
    from evoquant.reconstruct.solver import output_target_solver

    candidates = [output_target_solver(problem), adaround_solver(problem)]
    return min(candidates, key=lambda states: problem.equations.error(problem.grid.values(states)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--source", choices=["gan", "fractal"], default="fractal")
    parser.add_argument("--per-layer", action="store_true", help="add each layer's report (errors on the fit and check images, rows kept) to the row")
    parser.add_argument("--settings", help="a JSON list of ReconstructConfig field dicts (default: the built-in sweep)")
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant.config import RefineConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from baselines import register
    from stages import zoo_models, zoo_refine

    register()
    from evoquant.reconstruct.solver import register_solver

    register_solver("lower-of-output-adaround", lower_of_output_adaround)
    settings = json.loads(args.settings) if args.settings else SETTINGS
    base = RefineConfig.from_yaml("default")
    for name, bits, built, model, spec, heldout in zoo_models(args.source, args.models, args.bits, "evoquant-knobs-"):
        for setting in settings:
            config = dataclasses.replace(base, reconstruct=dataclasses.replace(base.reconstruct, **setting))
            started = time.perf_counter()
            result = zoo_refine(model, built, spec, heldout, stages="reconstruct", config=config)
            stage = result.stages[0]
            layers = [layer for layer in stage.details["layers"] if layer.get("error_after")]
            print(json.dumps({
                "benchmark": "reconstruct_knobs", "model": name, "weight_bits": bits, "source": args.source, "setting": setting,
                "int8_kl": result.heldout_before.kl, "int8_accuracy": result.heldout_before.accuracy,
                "kl": stage.heldout.kl, "accuracy": stage.heldout.accuracy, "verification_fitness": stage.verification.fitness,
                "verification_fitness_start": result.verification_before.fitness,
                # summed layer errors after the solve, and with each layer's bias re-fitted too (measured, not applied)
                "layer_error_after": sum(layer["error_after"] for layer in layers),
                "layer_error_bias_refit": sum(layer["error_bias_refit"] for layer in layers),
                "rows_kept": sum(layer.get("rows_kept", 0) for layer in layers),
                **({"layers": stage.details["layers"]} if args.per_layer else {}),
                "stage_seconds": round(stage.seconds, 1), "wall_seconds": round(time.perf_counter() - started, 1),
                "openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__,
            }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
