"""How many images the reconstruction fits on, over several draws of refine's data: one JSON line per
(model, images, data seed).

Held-out KL after default refine moves by up to 1.8x between draws of the same synthetic source
(docs/datafree.md), more than most single-draw differences between settings; this sweeps
``reconstruct.images`` with every draw (``data_seed``) so a setting is judged by its median and spread.
NNCF calibrated on 300 images of the source (``stages.zoo_models``); held-out 1,000 real digits.

    python benchmarks/reconstruct_draws.py --models mobilenet_v3_small --source gan > benchmarks/results/reconstruct_draws.jsonl
    python benchmarks/reconstruct_draws.py --models dw_separable_cnn,residual_cnn --source gan >> benchmarks/results/reconstruct_draws.jsonl
    python benchmarks/reconstruct_draws.py --models dw_separable_cnn --settings '[{}, {"solver": "exhaustive"}]'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mobilenet_v3_small")
    parser.add_argument("--source", choices=["gan", "fractal"], default="gan")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--images", default="512,1024,2048", help="reconstruct.images values, comma-separated")
    parser.add_argument("--settings", help='a JSON list of reconstruct settings to sweep instead of --images, e.g. \'[{"max_shift": 1}, {"max_shift": null}]\'')
    parser.add_argument("--data-seeds", default="1234,1,2", help="draws of refine's data (data_seed), comma-separated")
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant.config import RefineConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from baselines import register
    from quality import zoo_instance
    from stages import zoo_models, zoo_refine

    register()  # a setting may name a baseline solver: {"solver": "adaround"}

    base = RefineConfig.from_yaml("default")
    for name, bits, built, model, spec, heldout in zoo_models(args.source, args.models, args.bits, "evoquant-draws-"):
        instance = zoo_instance(built.fp32_xml)  # which zoo model the rows score
        settings = json.loads(args.settings) if args.settings else [{"images": int(value)} for value in args.images.split(",")]
        for setting in settings:
            for data_seed in (int(value) for value in args.data_seeds.split(",")):
                started = time.perf_counter()
                reconstruct = dataclasses.replace(base.reconstruct, **setting)
                config = dataclasses.replace(base.replace(data_seed=data_seed), reconstruct=reconstruct)
                result = zoo_refine(model, built, spec, heldout, config=config)
                print(json.dumps({"benchmark": "reconstruct_draws", "model": name, "weight_bits": bits, "source": args.source, "images": reconstruct.images,
                                  "setting": setting,
                                  "data_seed": data_seed, "int8_kl": result.heldout_before.kl, "refined_kl": result.heldout_after.kl,
                                  "refined_accuracy": result.heldout_after.accuracy, "chosen_stage": result.chosen_stage,
                                  "wall_seconds": round(time.perf_counter() - started, 1), **instance, "openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
