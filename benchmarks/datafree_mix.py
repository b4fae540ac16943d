"""Refine data for a user with no data: one data-free source, fractals, or a mix, from one NNCF start.

For each zoo classifier, NNCF quantizes the FP32 IR calibrated on 300 images from ``--calibrated-on``'s
data (default GDFQ's generator, made from the FP32 model's BatchNorm statistics alone, cached beside the
zoo), then refine (default preset) runs on 4,096 images of each ``--refine-data`` entry: a source (a
data-free method with its options, as in calibration.py, ``fractal``, or ``gan``: the zoo's GAN trained on
the real digits, the reference to beat), or several joined by ``+`` in
equal shares, seeded and shuffled. Held-out: 1,000 real digits never used before the report. One JSON
line per (model, bits, refine data, seed).

    python benchmarks/datafree_mix.py --models bn_cnn,residual_cnn,dw_separable_cnn --bits 4 --seeds 0,1,2 \\
        > benchmarks/results/datafree_mix.jsonl
    python benchmarks/datafree_mix.py --models bn_cnn,residual_cnn --calibrated-on clusterq \\
        --refine-data clusterq clusterq+gdfq+clusterq:width=32
    python benchmarks/datafree_mix.py --models bn_cnn,residual_cnn --seeds 0 --calibrated-on gan --refine-data gan clusterq
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

IMAGES = 4096


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn")
    parser.add_argument("--bits", default="4")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--calibrated-on", default="gdfq", help="the source NNCF calibrates on: a data-free method, fractal or gan (default: %(default)s)")
    parser.add_argument("--refine-data", nargs="+", default=["gdfq", "fractal", "gdfq+fractal"], help="refine data entries (default: %(default)s)")
    args = parser.parse_args(argv)

    from calibration import heldout_scores

    from evoquant import quantize, refine, zoo
    from evoquant.demo import calibration_images
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    _, _, x_heldout, y_heldout = zoo.mnist_split()
    with tempfile.TemporaryDirectory(prefix="evoquant-mix-") as workdir:
        for name in args.models.split(","):
            built = zoo.build(name, calibration=calibration_images())
            fp32_logits = infer(compile_ir(read_ir(built.fp32_xml), f32=True), x_heldout)[0]
            shape = x_heldout.shape[1:]
            calibration = _spec(built, args.calibrated_on)
            datas = {entry: _refine_data(built, entry, shape) for entry in args.refine_data}
            for bits in (int(b) for b in args.bits.split(",")):
                start = Path(workdir) / f"{name}_w{bits}.xml"
                quantize(built.fp32_xml, calibration=calibration, output=start, subset_size=300, weight_bits=bits,
                         weight_storage="keep")  # 4-bit weights as NNCF writes them (stages.zoo_models says why)
                before = heldout_scores(start, fp32_logits, x_heldout, y_heldout)
                for label, data in datas.items():
                    for seed in (int(s) for s in args.seeds.split(",")):
                        output = Path(workdir) / f"{name}_w{bits}_refined.xml"
                        result = refine(start, reference=built.fp32_xml, data=data, output=output, seed=seed, progress=False, weight_storage="keep")
                        after = heldout_scores(output, fp32_logits, x_heldout, y_heldout)
                        print(json.dumps({"benchmark": "datafree_mix", "model": name, "weight_bits": bits, "calibrated_on": args.calibrated_on, "refine_data": label, "seed": seed,
                                          "int8_kl": before["kl"], "int8_accuracy": before["accuracy"], "refined_kl": after["kl"], "refined_accuracy": after["accuracy"],
                                          "chosen_stage": result.chosen_stage}), flush=True)
    return 0


def _spec(built, source: str) -> str:
    """The data spec of ``source`` for zoo model ``built``: fractals, the zoo's GAN (trained on the real digits:
    the reference a data-free source is measured against), or a data-free method's cached data."""
    from evoquant import zoo
    from evoquant.demo import data_free_source

    if source in ("fractal", "gan"):
        return "fractal" if source == "fractal" else f"gan:{zoo.build_gan()}"
    if source.endswith(".npz"):  # images made elsewhere (e.g. an experiment's own synthesis)
        return source
    return data_free_source(built, source, progress=False, echo=lambda *_: None)


def _refine_data(built, entry: str, shape):
    """One source's spec, or for ``A+B+...`` a seeded shuffle of IMAGES images in equal shares of each."""
    from evoquant.data import Batch, load_source

    parts = entry.split("+")
    if len(parts) == 1:
        return _spec(built, entry)
    share = IMAGES // len(parts)
    images = np.concatenate([load_source(_spec(built, part)).sample(share, shape, seed=5 + k).images for k, part in enumerate(parts)])
    return Batch(np.ascontiguousarray(images[np.random.default_rng(9).permutation(len(images))]), None)


if __name__ == "__main__":
    sys.exit(main())
