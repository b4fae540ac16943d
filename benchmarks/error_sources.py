"""Where the held-out KL left after refine comes from: weights or activations, and which layers
(``evoquant.analyze`` on the zoo).

    python benchmarks/error_sources.py --models dw_separable_cnn --bits 4 --source gan
    python benchmarks/error_sources.py --models all --bits 4 >> benchmarks/results/error_sources.jsonl
    python benchmarks/error_sources.py --models dw_separable_cnn --keep-fp32 type:GroupConvolution
    python benchmarks/error_sources.py --models classic --source genie:seed=0   # no real image before the scores

For each zoo model: NNCF's start (300 images of the source, as in benchmarks/quality.py) and the default
refine of it on the same source. For both models, held-out KL(FP32 || model) on 1,000 real digits
(AIMET's QuantAnalyzer asks the same questions):

- ``kl``: the model as written;
- ``kl_fp32_weights``: every quantized weight replaced by the FP32 model's, and the bias after it too (NNCF's
  bias correction moved it to cancel the rounding's mean error): the activation quantizers, with the ranges
  the model has, are all that is left quantized (``weights_replaced`` of ``weights``: a weight NNCF's
  SmoothQuant rescaled, as in the ViT, is not the FP32 one and stays);
- ``kl_no_activation_quantizers``: every activation FakeQuantize removed (only the weights quantized);
- ``layers`` (refined model only): per quantized weight, the KL with that one weight (and its bias) back in FP32 and the
  rest as refined. A value above ``kl`` means the later layers' fits compensate this layer's error;
  ``activations`` likewise, per activation quantizer removed alone.

``--keep-fp32 SCOPE`` adds one more NNCF start with SCOPE left in floating point (``evoquant quantize
--ignored-scope`` syntax: names, ``re:``, ``type:``) and its refine: what mixed precision would buy.
One JSON line per (model, bits, source[, scope]).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def analyse(xml: Path, reference_xml: Path, heldout, *, layers: bool) -> dict:
    """``evoquant.analyze`` on the held-out digits, as a row's fields."""
    from evoquant import analyze
    from evoquant.data import Batch

    images, labels = heldout
    result = analyze(xml, reference=reference_xml, data=Batch(images, labels), images=len(images), layers=layers)
    row = {"kl": result.quantized, "kl_fp32_weights": result.fp32_weights, "weights_replaced": result.weights_replaced,
           "kl_no_activation_quantizers": result.no_activation_quantizers, "activation_quantizers": result.activation_quantizers,
           "kl_nothing_quantized": result.nothing_quantized, "weights": result.weights}
    if layers:
        row["layers"] = [{"layer": layer.layer, "type": layer.type, "shape": list(layer.shape), "bits": 4 if layer.element_type in ("i4", "u4") else 8,
                          "kl_this_fp32": layer.error_fp32} for layer in result.layers]
        row["activations"] = [{"quantizer": quantizer.quantizer, "kl_without": quantizer.error_without} for quantizer in result.activations]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="classic", help="zoo models or groups: classic, families, all (default: %(default)s)")
    parser.add_argument("--bits", default="4", help="weight bits, comma-separated (default: %(default)s)")
    parser.add_argument("--source", default="gan", help="gan, fractal, or a data-free method as calibration.py --datafree takes it (genie:seed=0; its images cached beside the zoo) (default: %(default)s)")
    parser.add_argument("--gan-seed", type=int, default=0)
    parser.add_argument("--keep-fp32", default=None, metavar="SCOPE", help="also quantize with SCOPE left in floating point and refine that")
    args = parser.parse_args()

    import nncf
    import openvino

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quality import zoo_instance
    from stages import zoo_models, zoo_refine

    from evoquant import quantize, zoo
    from evoquant.demo import CALIBRATION_SIZE, calibration_images, canonical_method, data_free_source

    work = Path(tempfile.mkdtemp(prefix="evoquant-errors-"))
    datafree = args.source not in ("gan", "fractal")
    source = canonical_method(args.source) if datafree else args.source
    for name, bits, built, model, spec, heldout in zoo_models("gan" if datafree else args.source, args.models, args.bits, "evoquant-errors-", gan_seed=args.gan_seed):
        if zoo.REGISTRY[name].task != "classification":
            continue
        if datafree:  # the data-free method's images (made once, cached beside the zoo) for calibration and refine
            spec = data_free_source(built, args.source, progress=False, echo=lambda *_: None)

        def nncf_start(output: Path, **options) -> Path:
            """NNCF's W{bits}A8 model of ``built`` on 300 images of ``spec``, as ``stages.zoo_models`` makes it."""
            quantize(built.fp32_xml, calibration=calibration_images(spec, shape=heldout[0].shape[1:])[:CALIBRATION_SIZE], output=output, weight_bits=bits,
                     model_type=zoo.REGISTRY[name].model_type, weight_storage="keep", **options)
            return output

        starts = [(None, nncf_start(work / f"{name}_w{bits}_datafree.xml") if datafree else Path(model))]
        if args.keep_fp32:
            starts.append((args.keep_fp32, nncf_start(work / f"{name}_w{bits}_mixed.xml", ignored_scope=args.keep_fp32)))
        for scope, start in starts:
            refined = work / f"{name}_w{bits}_{'mixed' if scope else 'all'}_refined.xml"
            started = time.perf_counter()
            zoo_refine(start, built, spec, heldout, output=refined)
            seconds = time.perf_counter() - started
            row = {"benchmark": "error_sources", "model": name, "weight_bits": bits, "source": source, "gan_seed": args.gan_seed if args.source == "gan" else None,
                   "fp32_scope": scope, "refine_seconds": round(seconds, 1),
                   "nncf": analyse(start, built.fp32_xml, heldout, layers=False),
                   "refined": analyse(refined, built.fp32_xml, heldout, layers=scope is None),
                   "openvino": openvino.__version__.split("-")[0], "nncf_version": nncf.__version__, **zoo_instance(built.fp32_xml)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
