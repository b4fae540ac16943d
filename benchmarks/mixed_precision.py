"""W4A8 with a share of the weights at 8 bits (``evoquant quantize --ratio``), then the default refine.

    python benchmarks/mixed_precision.py --models dw_separable_cnn --ratios 1,0.95,0.9
    python benchmarks/mixed_precision.py --models all >> benchmarks/results/mixed_precision.jsonl

For each zoo classifier: NNCF's W4A8 model calibrated on 300 images of the source (GAN instance
``--gan-seed``, as benchmarks/quality.py), with ``ratio`` of its weights kept at 4 bits and the rest at 8
(chosen by ``evoquant.quantize``: the layers whose error a layer-wise fit at 4 bits leaves largest per
weight), refined with the default preset on the same source; held-out KL(FP32 || model) and accuracy on
1,000 real digits never used before the scores. ``change`` in the table is measured from the all-4-bit
NNCF model (ratio 1), so a row says what a budget of 8-bit weights buys over W4A8. One JSON line per
(model, ratio).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="classic", help="zoo models or groups: classic, families, all (default: %(default)s)")
    parser.add_argument("--ratios", default="1,0.95,0.9", help="shares of the weights kept at 4 bits, comma-separated (default: %(default)s)")
    parser.add_argument("--source", choices=["gan", "fractal"], default="gan")
    parser.add_argument("--gan-seed", type=int, default=0)
    args = parser.parse_args()

    import nncf
    import openvino

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import zoo_instance
    from stages import zoo_refine, zoo_setups

    from evoquant import quantize, zoo
    from evoquant.demo import CALIBRATION_SIZE

    work = Path(tempfile.mkdtemp(prefix="evoquant-mixed-"))
    for name, built, spec, calibration, (x_heldout, y_heldout) in zoo_setups(args.source, args.models, args.gan_seed):
        if zoo.REGISTRY[name].task != "classification":
            continue
        calibration = calibration[:CALIBRATION_SIZE]
        for ratio in (float(r) for r in args.ratios.split(",")):
            start = work / f"{name}_r{ratio}.xml"
            started = time.perf_counter()
            made = quantize(built.fp32_xml, calibration=calibration, output=start, weight_bits=4, ratio=ratio,
                            model_type=zoo.REGISTRY[name].model_type, weight_storage="keep")
            quantize_seconds = time.perf_counter() - started
            started = time.perf_counter()
            result = zoo_refine(start, built, spec, (x_heldout, y_heldout), output=work / f"{name}_r{ratio}_refined.xml")
            seconds = time.perf_counter() - started
            row = {"benchmark": "mixed_precision", "model": name, "weight_bits": 4, "source": args.source,
                   "gan_seed": args.gan_seed if args.source == "gan" else None, "ratio": ratio,
                   "four_bit_share": made.four_bit_share if made.four_bit_share is not None else 1.0, "int8_layers": list(made.int8_layers),
                   "quantize_seconds": round(quantize_seconds, 1), "refine_seconds": round(seconds - result.heldout_seconds, 1),
                   "fp32_accuracy": result.heldout_reference.accuracy if result.heldout_reference else None,
                   "nncf_kl": result.heldout_before.kl, "nncf_accuracy": result.heldout_before.accuracy,
                   "refined_kl": result.heldout_after.kl, "refined_accuracy": result.heldout_after.accuracy,
                   "openvino": openvino.__version__.split("-")[0], "nncf_version": nncf.__version__, **zoo_instance(built.fp32_xml)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
