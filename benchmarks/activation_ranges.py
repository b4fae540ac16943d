"""Activation ranges before the weights are reconstructed: one JSON line per (model, source, variant).

For each zoo classifier, NNCF quantizes the FP32 IR (W4A8 by default) calibrated on 300 images of the
source (GAN and fractal starts as the quality table makes them, data-free ones as benchmarks/datafree_mix.py
does); then refine (default preset) runs on the source's data with each ``--variants`` entry:

- ``nncf``: NNCF's ranges (``--stages reconstruct,compose``: no ranges stage);
- ``observed``: the ranges stage as the default runs it (each activation quantizer widened to cover what
  its input takes on the fit images);
- ``nncf+observed``: the ranges stage with both candidates, each reconstructed and scored, the better taken;
- ``xF`` (e.g. ``x1.25``): every activation range but the input's times F before refine, no ranges stage
  (the first measurement, which found that NNCF's ranges are too tight).

Held-out: 1,000 real digits. Also recorded: refine's verification fitness on the synthetic images (to
see whether the synthetic data alone would pick what the real digits prefer) and the ranges stage's choice.

    python benchmarks/activation_ranges.py --sources gan,fractal >> benchmarks/results/activation_ranges.jsonl
    python benchmarks/activation_ranges.py --models resnet18,mobilenet_v3_small,vit --sources gan >> benchmarks/results/activation_ranges.jsonl
    python benchmarks/activation_ranges.py --variants x1.0,x1.1,x1.25 --sources gan,genie   # the first measurement
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--sources", default="gan,genie", help="calibration and refine data: gan, fractal, or a data-free method (default: %(default)s)")
    parser.add_argument("--variants", default="nncf,observed,nncf+observed", help="nncf, observed, nncf+observed, xF (default: %(default)s)")
    parser.add_argument("--bits", default="4")
    args = parser.parse_args(argv)

    from calibration import heldout_scores
    from datafree_mix import _spec
    from stages import zoo_models, zoo_refine

    from evoquant import quantize, zoo
    from evoquant.config import RefineConfig
    from evoquant.demo import calibration_images
    from evoquant.ir.ranges import scale_activation_ranges
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.paths import save_ir

    def variant_run(start: Path, variant: str, folder: Path) -> tuple[Path, dict]:
        """The model refine starts from and refine's settings for one variant."""
        if variant.startswith("x"):
            model = read_ir(start)
            scale_activation_ranges(model, float(variant[1:]))
            widened = folder / f"{start.stem}_{variant}.xml"
            save_ir(model, widened)
            return widened, {"stages": "reconstruct,compose"}
        if variant == "nncf":
            return start, {"stages": "reconstruct,compose"}
        candidates = {"observed": ("observed",), "nncf+observed": ("nncf", "observed")}[variant]
        return start, {"config": RefineConfig.from_yaml("default").replace(ranges={"candidates": candidates})}

    def starts(workdir: Path):
        """(name, source, bits, built, start IR, refine data spec, held-out) per model and source: GAN and fractal
        starts as the quality table makes them (any zoo model), data-free ones as datafree_mix.py does."""
        for source in args.sources.split(","):
            if source in ("gan", "fractal"):
                for name, bits, built, model, spec, heldout in zoo_models(source, args.models, args.bits, "evoquant-ranges-"):
                    yield name, source, bits, built, Path(model), spec, heldout
                continue
            for name in args.models.split(","):
                built = zoo.build(name, calibration=calibration_images())
                spec = _spec(built, source)
                for bits in (int(b) for b in args.bits.split(",")):
                    start = workdir / f"{name}_{source}_w{bits}.xml"
                    quantize(built.fp32_xml, calibration=spec, output=start, subset_size=300, weight_bits=bits, weight_storage="keep")
                    yield name, source, bits, built, start, spec, zoo.mnist_split()[2:]

    with tempfile.TemporaryDirectory(prefix="evoquant-ranges-") as workdir:
        for name, source, bits, built, start, spec, (x_heldout, y_heldout) in starts(Path(workdir)):
            fp32_logits = infer(compile_ir(read_ir(built.fp32_xml), f32=True), x_heldout)[0]
            for variant in args.variants.split(","):
                model, options = variant_run(start, variant, Path(workdir))
                before = heldout_scores(model, fp32_logits, x_heldout, y_heldout)
                output = Path(workdir) / "refined.xml"
                result = zoo_refine(model, built, spec, (x_heldout, y_heldout), output=output, seed=0, **options)
                after = heldout_scores(output, fp32_logits, x_heldout, y_heldout)
                ranges = next((stage.details for stage in result.stages if stage.name == "ranges"), None)
                print(json.dumps({"benchmark": "activation_ranges", "model": name, "source": source, "weight_bits": bits, "variant": variant,
                                  "int8_kl": before["kl"], "int8_accuracy": before["accuracy"], "refined_kl": after["kl"], "refined_accuracy": after["accuracy"],
                                  "verification_start": result.verification_before.fitness, "verification_refined": result.verification_after.fitness,
                                  "chosen_stage": result.chosen_stage, "ranges": ranges and {key: ranges[key] for key in ("chosen", "trials", "widened", "factor_median", "factor_max")},
                                  "refine_seconds": round(result.wall_seconds - result.heldout_seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
