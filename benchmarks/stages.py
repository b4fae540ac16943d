"""What each refine stage buys, on the zoo at W8A8 and W4A8: one JSON line per (model, bits, stages, seed).

For each zoo model: NNCF quantizes the FP32 IR (calibrated on 300 synthetic images; W4A8 through
``evoquant.quantize(weight_bits=4)``), then refine runs with ``--stages evolve`` (the search alone, the
previous default), ``reconstruct`` (layer-wise alone) and ``reconstruct,evolve`` (the default), on the same
synthetic source only. ``--baselines gptq,adaround`` adds the classic layer-wise methods
(``benchmarks/baselines/``) run as refine's reconstruct stage, over the quantizer's whole range, on the same
images. Held-out: 1,000 real MNIST digits never used for calibration or selection.

    python benchmarks/stages.py --source fractal > benchmarks/results/stages.jsonl
    python benchmarks/stages.py --models residual_cnn --bits 4 --seeds 0,1,2
    python benchmarks/stages.py --stages reconstruct --baselines gptq,adaround >> benchmarks/results/stages.jsonl
    python benchmarks/stages.py --stages ranges,reconstruct --baselines gptq,adaround --baseline-ranges --source gan   # against the default
    python benchmarks/readme_table.py stages benchmarks/results/stages.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

STAGE_SETS = ("evolve", "reconstruct", "reconstruct,evolve")


def zoo_models(source: str, models: str, bits: str, prefix: str, gan_seed: int = 0, weight_storage: str = "keep"):
    """The zoo's quantized models the benchmarks start from: yields ``(name, bits, built, model, spec,
    heldout)`` -- NNCF calibrated on 300 images of ``source`` (GAN instance ``gan_seed``), the source's data
    spec and the held-out digits as the model takes them. The zoo is built as the demo builds it (its INT8
    model calibrated on GAN instance 0, so switching sources never retrains it); that INT8 model is used
    as is at W8A8 on GAN instance 0, every other start is quantized into a temporary folder the same way
    (``evoquant.quantize``, the model's NNCF model type)."""
    from evoquant import quantize, zoo
    from evoquant.demo import CALIBRATION_SIZE

    work = Path(tempfile.mkdtemp(prefix=prefix))
    for name, built, spec, calibration, (x_heldout, y_heldout) in zoo_setups(source, models, gan_seed):
        for weight_bits in (int(b) for b in bits.split(",")):
            model = built.int8_xml
            if weight_bits != 8 or source != "gan" or gan_seed != 0:
                model = work / f"{name}_w{weight_bits}a8_gan{gan_seed}.xml"
                # weight_storage "keep": the tables measure 4-bit weights as NNCF writes them (evoquant's default, auto, stores
                # them in 8-bit constants where OpenVINO computes them wrongly with several streams: docs/usage.md measures that)
                quantize(built.fp32_xml, calibration=calibration[:CALIBRATION_SIZE], output=model, weight_bits=weight_bits,
                         model_type=zoo.REGISTRY[name].model_type, weight_storage=weight_storage)
            yield name, weight_bits, built, model, spec, (x_heldout, y_heldout)


def zoo_setups(source: str, models: str, gan_seed: int = 0):
    """What every zoo benchmark starts from, per model: yields ``(name, built, spec, calibration, heldout)`` -- the
    zoo model built as the demo builds it (its INT8 model calibrated on GAN instance 0), the source's data spec
    (GAN instance ``gan_seed``), the source's calibration images and the held-out digits as the model takes them."""
    from evoquant import zoo
    from evoquant.demo import calibration_images, resolve_models, synthetic_source

    quiet = {"progress": False, "echo": lambda *_: None}
    for name in resolve_models(models):
        shape = zoo.input_shape_of(name)
        built = zoo.build(name, calibration=calibration_images(synthetic_source("gan", shape=shape, **quiet), shape=shape))
        spec = synthetic_source(source, shape=shape, gan_seed=gan_seed, **quiet)
        _, _, x_heldout, y_heldout = zoo.mnist_split(shape)
        yield name, built, spec, calibration_images(spec, shape=shape), (x_heldout, y_heldout)


def zoo_refine(model, built, spec, heldout, **options):
    """``evoquant.refine`` on a zoo start from :func:`zoo_models`: against its FP32 model, on ``spec``, scored on
    the held-out digits, with the zoo model's input shape given (the families' IRs take ``[?,3,?,?]``, which
    a fractal does not fix). 4-bit weights are written as they are (``weight_storage="keep"`` unless given: see
    :func:`zoo_models`)."""
    from evoquant import refine

    options.setdefault("weight_storage", "keep")
    return refine(model, reference=built.fp32_xml, data=spec, heldout=heldout, input_shape=(1, *heldout[0].shape[1:]), progress=False, **options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--bits", default="8,4", help="weight bits to run, comma-separated")
    parser.add_argument("--stages", default=";".join(STAGE_SETS), help="stage sets separated by ';'")
    parser.add_argument("--seeds", default="0", help="search seeds (the reconstruction alone is deterministic: run once)")
    parser.add_argument("--source", choices=["gan", "fractal"], default="fractal")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--search", default="", metavar="K=V,...", help="search settings to override for every run (e.g. tie_probability=1.0,tie_pool=0.05: "
                        "moves guided by the reconstruction's flip costs); the stage-set label gets '+' and the overrides")
    parser.add_argument("--compose", default="", metavar="YAML", help="compose settings for every run, a YAML mapping (e.g. '{fits: [{inputs: fp32}, {damping: 0.1}]}')")
    parser.add_argument("--baselines", default="", help="classic layer-wise methods to add, comma-separated (gptq, adaround)")
    parser.add_argument("--baseline-ranges", action="store_true", help="also run each baseline after the ranges stage (label baseline:NAME+ranges), as the default runs evoquant's solver")
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant.config import RefineConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from baselines import BASELINES, register

    register()
    baselines = [name.strip() for name in args.baselines.split(",") if name.strip()]
    unknown = [name for name in baselines if name not in BASELINES]
    if unknown:
        parser.error(f"unknown baseline(s) {', '.join(unknown)}; known: {', '.join(BASELINES)}")
    preset = RefineConfig.from_yaml(args.preset)
    import yaml

    overrides = {key: yaml.safe_load(value) for key, value in (item.split("=", 1) for item in args.search.split(",") if item)}
    preset = preset.replace(search=overrides, compose=yaml.safe_load(args.compose) or {})
    suffix = f"+{args.search}" if args.search else ""
    runs = [(stages + (suffix if "evolve" in stages else ""), stages, preset) for stages in args.stages.split(";") if stages]
    for name in baselines:
        solver = dataclasses.replace(preset, reconstruct=dataclasses.replace(preset.reconstruct, solver=name, max_shift=None))
        runs.append((f"baseline:{name}", "reconstruct", solver))
        if args.baseline_ranges:
            runs.append((f"baseline:{name}+ranges", "ranges,reconstruct", solver))

    for name, bits, built, model, spec, heldout in zoo_models(args.source, args.models, args.bits, "evoquant-stages-"):
        for label, stages, config in runs:
            searched = "evolve" in stages or "compose" in stages  # the reconstruction alone is deterministic
            seeds = [int(s) for s in args.seeds.split(",")] if searched else [0]
            for seed in seeds:
                started = time.perf_counter()
                result = zoo_refine(model, built, spec, heldout, stages=stages, config=config, seed=seed)
                row = {
                    "benchmark": "stages", "model": name, "weight_bits": bits, "stages": label, "seed": seed, "source": args.source,
                    "preset": args.preset, "chosen_stage": result.chosen_stage, "evaluations": result.evaluations,
                    "wall_seconds": round(time.perf_counter() - started, 1),
                    "stage_seconds": {stage.name: round(stage.seconds, 1) for stage in result.stages},
                    "stage_verification_fitness": {stage.name: stage.verification.fitness for stage in result.stages},
                    # each stage's own result on the held-out digits, written or not (a baseline's is its reconstruct)
                    "stage_heldout_kl": {stage.name: stage.heldout.kl for stage in result.stages},
                    "stage_heldout_accuracy": {stage.name: stage.heldout.accuracy for stage in result.stages},
                    "verification_fitness_start": result.verification_before.fitness,
                    "engine": result.engine,
                    "compose_settings": {"fits": [dict(fit) for fit in config.compose.fits], "generations": config.compose.generations, "images": config.compose.images},
                    "compose": next(({key: stage.details[key] for key in ("layers_per_fit", "uniform_selection", "selection_before", "selection_after", "evaluations", "fit_seconds", "fit_layers_skipped", "search_seconds", "stop_reason", "history")}
                                     for stage in result.stages if stage.name == "compose"), None),
                    "openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__,
                }
                for model_label, metrics in (("fp32", result.heldout_reference), ("int8", result.heldout_before), ("refined", result.heldout_after)):
                    row[f"{model_label}_accuracy"] = metrics.accuracy
                    row[f"{model_label}_kl"] = metrics.kl
                    row[f"{model_label}_mse"] = metrics.mse
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
