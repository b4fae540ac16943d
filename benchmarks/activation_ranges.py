"""Are NNCF's activation ranges too tight for a refined model? One JSON line per (model, source, factor).

For each zoo classifier, NNCF quantizes the FP32 IR (W4A8 by default) calibrated on 300 images of the
source (GAN and fractal starts as the quality table makes them, data-free ones as benchmarks/datafree_mix.py
does); then every activation FakeQuantize range but the input's is
multiplied by each ``--factors`` value (the same levels over a wider range: less clipping, coarser steps),
and refine (default preset) runs on the source's data. Held-out: 1,000 real digits. Also recorded:
refine's verification fitness on the synthetic images, to see whether the synthetic data alone would pick
the factor the real digits prefer.

    python benchmarks/activation_ranges.py --sources gan,genie > benchmarks/results/activation_ranges.jsonl
    python benchmarks/activation_ranges.py --models resnet18,mobilenet_v3_small,vit --sources gan >> benchmarks/results/activation_ranges.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def scale_activation_ranges(xml: Path, factor: float, output: Path) -> None:
    """``xml`` with its activation FakeQuantize ranges (all four bounds) times ``factor``, written to ``output``;
    the FakeQuantize right after the model input is left as it is (an image's range is the image's range)."""
    import openvino.opset13 as opset

    from evoquant.ir.runtime import read_ir
    from evoquant.paths import save_ir

    model = read_ir(xml)
    inputs = {parameter.get_friendly_name() for parameter in model.get_parameters()}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FakeQuantize" or node.input_value(0).get_node().get_friendly_name() in inputs:
            continue
        if node.input_value(0).get_node().get_type_name() == "Constant":
            continue  # a weight's FakeQuantize (the FakeQuantize weight form), not an activation's
        for port in (1, 2, 3, 4):
            bound = node.input_value(port).get_node().get_data()
            node.input(port).replace_source_output(opset.constant((bound * factor).astype(np.float32)).output(0))
    model.validate_nodes_and_infer_types()
    save_ir(model, output)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--sources", default="gan,genie", help="calibration and refine data: gan, fractal, or a data-free method (default: %(default)s)")
    parser.add_argument("--factors", default="1.0,1.1,1.25")
    parser.add_argument("--bits", default="4")
    args = parser.parse_args(argv)

    from calibration import heldout_scores
    from datafree_mix import _spec
    from stages import zoo_models, zoo_refine

    from evoquant import quantize, zoo
    from evoquant.demo import calibration_images
    from evoquant.ir.runtime import compile_ir, infer, read_ir

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
            for factor in (float(f) for f in args.factors.split(",")):
                widened = Path(workdir) / f"{name}_{source}_w{bits}_x{factor}.xml"
                scale_activation_ranges(start, factor, widened)
                before = heldout_scores(widened, fp32_logits, x_heldout, y_heldout)
                output = Path(workdir) / "refined.xml"
                result = zoo_refine(widened, built, spec, (x_heldout, y_heldout), output=output, seed=0)
                after = heldout_scores(output, fp32_logits, x_heldout, y_heldout)
                print(json.dumps({"benchmark": "activation_ranges", "model": name, "source": source, "weight_bits": bits, "range_factor": factor,
                                  "int8_kl": before["kl"], "int8_accuracy": before["accuracy"], "refined_kl": after["kl"], "refined_accuracy": after["accuracy"],
                                  "verification_start": result.verification_before.fitness, "verification_refined": result.verification_after.fitness,
                                  "chosen_stage": result.chosen_stage, "refine_seconds": round(result.wall_seconds - result.heldout_seconds, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
