"""Calibration data vs held-out accuracy on the zoo classifiers: the shape of arXiv 2305.06052's table.

For each zoo classifier: the held-out accuracy of the FP32 IR, and of INT8 IRs quantized by
``evoquant.quantize`` (``nncf.quantize``, default settings) calibrated with the same number of images from
each source -- real training digits, the compact GAN trained on them, a distilled student of that GAN,
fractal images and Gaussian noise, and data-free data made from the FP32 model alone (``--datafree``:
ZeroQ, Genie, GDFQ, Qimera, ClusterQ; cached beside the zoo) -- plus KL(FP32‖INT8) on the held-out digits, at
W8A8 and (``--bits 8,4``) W4A8. With ``--refine PRESET``,
each INT8 model is also refined with its own source's data (KL against the FP32 teacher) and scored again.
One JSON line per (model, source). Held-out real digits are only ever used to score.

    python benchmarks/calibration.py --gan /tmp/gan-mnist --student /tmp/gan-student --models bn_cnn
    python benchmarks/calibration.py --gan /tmp/gan-mnist --refine fast > results/calibration.jsonl
    python benchmarks/calibration.py --datafree zeroq,gdfq,qimera,clusterq --bits 8,4 --refine default --seeds 0,1,2

``--gan`` / ``--student`` are generator directories (``benchmarks/gan.py`` makes both); a source whose
directory is not given is skipped, except the families' GAN: the zoo's of their image size (``--gan-seed N``:
its instance N, e.g. ``--models mobilenet_v3_small,resnet18 --gan-seed 1 --sources gan``).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path


def heldout_scores(int8_xml, fp32_logits, x_heldout, y_heldout) -> dict:
    """Held-out accuracy of an IR and KL(FP32‖INT8) of its softmax, with plain OpenVINO defaults."""
    import numpy as np

    from evoquant.fitness.objectives import kl_to_teacher
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    from evoquant.ir.runtime import with_sample_shape

    logits = infer(compile_ir(with_sample_shape(read_ir(int8_xml), x_heldout.shape[1:])), x_heldout)[0]
    return {"accuracy": float(np.mean(logits.argmax(1) == y_heldout)), "kl": kl_to_teacher([logits], [fp32_logits])}


def split_methods(listing: str) -> list[str]:
    """``clusterq:width=32,steps=3000,genie`` → ``["clusterq:width=32,steps=3000", "genie:mixes=3"]``: an item
    with '=' and no ':' is an option of the method before it; each method named so that the name says which
    data it is (``evoquant.demo.canonical_method``: Genie's default mixes written out)."""
    from evoquant.demo import canonical_method

    methods: list[str] = []
    for item in (item.strip() for item in listing.split(",") if item.strip()):
        if methods and "=" in item and ":" not in item:
            methods[-1] += f",{item}"
        else:
            methods.append(item)
    return [canonical_method(method) for method in methods]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="classifiers", help="comma-separated zoo classifiers, or 'classifiers'")
    parser.add_argument("--gan", help="generator directory trained on the zoo's training digits (for the models of its image size; the others "
                        "take the zoo's GAN of theirs)")
    parser.add_argument("--gan-seed", type=int, metavar="N", help="the zoo's GAN instance N (trained and cached on first use) for every model "
                        "--gan does not cover (default: instance 0 for the families; the 28x28 models have a GAN source only with --gan or this)")
    parser.add_argument("--student", help="generator directory distilled from --gan")
    parser.add_argument("--images", type=int, default=300, help="calibration images per source (default: %(default)s)")
    parser.add_argument("--refine", metavar="PRESET", help="also refine each INT8 model with its source's data")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--datafree", default="", help="data-free methods to add as sources, comma-separated (zeroq,genie,gdfq,qimera,clusterq)")
    parser.add_argument("--bits", default="8", help="weight bits, comma-separated (8: W8A8, 4: W4A8)")
    parser.add_argument("--seeds", default="0", help="refine seeds (with --refine)")
    parser.add_argument("--data-seeds", help="refine data seeds (the draw from each source: data_seed), comma-separated; default: the preset's")
    parser.add_argument("--no-baselines", action="store_true", help="only the --datafree sources")
    parser.add_argument("--start", metavar="SOURCE", help="quantize every model once, calibrated on this source, and refine that one "
                        "start with each source's data (the refine comparison at a fixed start); default: each source quantizes its own")
    parser.add_argument("--sources", help="keep only these of real, gan, distilled_gan, fractal, gaussian_noise (comma-separated)")
    args = parser.parse_args()

    import numpy as np

    from evoquant import quantize, refine, zoo
    from evoquant.config import RefineConfig
    from evoquant.data import Batch
    from evoquant.demo import calibration_images, data_free_source, resolve_models, synthetic_source
    from evoquant.gan.generator import load_generator
    from evoquant.ir.runtime import compile_ir, infer, read_ir, with_sample_shape
    from quality import zoo_instance

    names = list(zoo.CLASSIFIERS) if args.models == "classifiers" else [n.strip() for n in args.models.split(",")]
    names = list(resolve_models(",".join(names)))
    methods = split_methods(args.datafree)
    preset = RefineConfig.from_yaml(args.refine) if args.refine else None
    preset_labels = {}
    if preset is not None:  # a preset file (--refine my.yaml) is named by what it changes in the reconstruction, which a row must say
        default_reconstruct = dataclasses.asdict(RefineConfig.from_yaml("default").reconstruct)
        changed = {key: value for key, value in dataclasses.asdict(preset.reconstruct).items() if value != default_reconstruct[key]}
        preset_labels = {"refine_preset": args.refine, **({"reconstruct_changes": changed} if changed else {})}

    gan_size = tuple(load_generator(args.gan).info.image_shape[-2:]) if args.gan else None

    def gan_for(shape) -> str | None:
        """The GAN source of models taking ``shape``: ``--gan`` where it makes images of their size, else the
        zoo's GAN of their size (instance ``--gan-seed``; the 28x28 models only when it is given)."""
        if gan_size == tuple(shape[-2:]):
            return f"gan:{args.gan}"
        if args.gan:
            print(f"calibration.py: --gan makes {gan_size[0]}x{gan_size[1]} images; the models taking {shape[-2]}x{shape[-1]} use the zoo's GAN "
                  f"of that size (instance {args.gan_seed or 0})", file=sys.stderr)
        elif shape == zoo.INPUT_SHAPE and args.gan_seed is None:
            return None
        return synthetic_source("gan", shape=shape, gan_seed=args.gan_seed or 0, progress=False, echo=lambda *_: None)

    def sources_for(shape) -> tuple[dict, dict]:
        """The calibration sources and refine data for models taking ``shape`` (C, H, W)."""
        x_train, y_train, _, _ = zoo.mnist_split(shape)
        # Real calibration digits come from the training split (never the held-out one), a seeded draw.
        pick = np.random.default_rng(7).permutation(len(x_train))[: args.images]
        sources = {"real": Batch(x_train[pick], y_train[pick])}
        # Refining with real data: the whole training split, shuffled (the preset's pool shrinks to what remains
        # after the verification images; never the held-out digits).
        refine_real = np.random.default_rng(8).permutation(len(x_train))
        refine_data = {"real": Batch(x_train[refine_real], y_train[refine_real])}
        gan = gan_for(shape)
        if gan is not None:
            sources["gan"] = gan
        if args.student and shape == zoo.INPUT_SHAPE:
            sources["distilled_gan"] = f"gan:{args.student}"
        sources["fractal"] = "fractal"
        sources["gaussian_noise"] = "noise:gaussian"
        if args.no_baselines:
            sources = {}
        if args.sources:
            keep = {name.strip() for name in args.sources.split(",")}
            sources = {name: spec for name, spec in sources.items() if name in keep}
        return sources, refine_data

    with tempfile.TemporaryDirectory(prefix="evoquant-calibration-") as workdir:
        for name in names:
            shape = zoo.input_shape_of(name)
            sources, refine_data = sources_for(shape)
            _, _, x_heldout, y_heldout = zoo.mnist_split(shape)
            built = zoo.build(name, calibration=calibration_images(synthetic_source("gan", shape=shape, progress=False, echo=lambda *_: None), shape=shape))
            fp32_logits = infer(compile_ir(with_sample_shape(read_ir(built.fp32_xml), shape), f32=True), x_heldout)[0]
            fp32_accuracy = float(np.mean(fp32_logits.argmax(1) == y_heldout))
            instance = zoo_instance(built.fp32_xml)  # which zoo model the rows score
            model_sources = dict(sources)
            for method in methods:
                made = time.perf_counter()
                model_sources[method] = data_free_source(built, method, progress=False, echo=lambda *_: None)
                print(json.dumps({"benchmark": "calibration", "model": name, "source": method, "datafree_seconds": round(time.perf_counter() - made, 1),
                                  "note": "time to make the data (0: cached from an earlier run)"}), flush=True)
            for bits in (int(b) for b in args.bits.split(",")):
                for source_name, spec in model_sources.items():
                    started = time.perf_counter()
                    calibrated_on = args.start or source_name
                    int8_xml = Path(workdir) / f"{name}_{calibrated_on}_w{bits}.xml"
                    if not int8_xml.exists():
                        calibration = model_sources[calibrated_on] if calibrated_on in model_sources else calibrated_on
                        quantize(built.fp32_xml, calibration=calibration, output=int8_xml, subset_size=args.images, weight_bits=bits,
                                 model_type=zoo.REGISTRY[name].model_type, input_shape=(1, *shape),
                                 weight_storage="keep")  # 4-bit weights as NNCF writes them (stages.zoo_models says why)
                    row = {
                        "benchmark": "calibration",
                        "model": name,
                        "source": source_name,
                        "weight_bits": bits,
                        "spec": spec if isinstance(spec, str) else "training split",
                        "calibrated_on": calibrated_on,
                        "images": args.images,
                        "fp32_accuracy": fp32_accuracy,
                        **instance,
                    }
                    scores = heldout_scores(int8_xml, fp32_logits, x_heldout, y_heldout)
                    row["int8_accuracy"], row["int8_kl"] = scores["accuracy"], scores["kl"]
                    row["accuracy_drop"] = fp32_accuracy - scores["accuracy"]
                    row["quantize_seconds"] = round(time.perf_counter() - started, 1)
                    if not args.refine:
                        print(json.dumps(row), flush=True)
                        continue
                    row.update(preset_labels)
                    data_seeds = [int(s) for s in args.data_seeds.split(",")] if args.data_seeds else [preset.data_seed]
                    for seed, data_seed in itertools.product((int(s) for s in args.seeds.split(",")), data_seeds):
                        started = time.perf_counter()
                        refined_xml = Path(workdir) / f"{name}_{source_name}_w{bits}_refined.xml"
                        result = refine(int8_xml, reference=built.fp32_xml, data=refine_data.get(source_name, spec), output=refined_xml,
                                        config=preset.replace(data_seed=data_seed), jobs=args.jobs, seed=seed, progress=False, weight_storage="keep",
                                        input_shape=(1, *shape))
                        refined = heldout_scores(refined_xml, fp32_logits, x_heldout, y_heldout)
                        row.update({"seed": seed, "data_seed": data_seed, "refined_accuracy": refined["accuracy"], "refined_kl": refined["kl"], "refine_improved": result.improved,
                                    "refine_evaluations": result.evaluations, "chosen_stage": result.chosen_stage, "seconds": round(time.perf_counter() - started, 1)})
                        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
