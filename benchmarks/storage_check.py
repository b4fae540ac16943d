"""What ``--weight-storage auto`` does to the zoo's W4A8 models, and what it costs. One JSON line per model.

Each model is quantized by NNCF at W4A8 as the quality table does (4-bit constants kept), then
``evoquant.ir.storage.settle_storage`` runs on 64 held-out digits as ``quantize`` and ``refine`` run it
before writing: the relative output difference under several streams, how many tensors it widened, the
difference after, how far widening moved the one-stream outputs, and its wall time. Held-out accuracy and
KL(FP32 || model) of the 4-bit and the widened model on 1,000 digits (one stream) and under THROUGHPUT.

    python benchmarks/storage_check.py > benchmarks/results/storage_check.jsonl
    python benchmarks/storage_check.py --models resnet18,mobilenet_v3_small,vit >> benchmarks/results/storage_check.jsonl
    python benchmarks/storage_check.py --models mobilenet_v3_small,resnet18 --repeats 6 >> benchmarks/results/storage_check.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,residual_cnn,dw_separable_cnn", help="zoo classifiers (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=0, help="also run the multi-stream check this many more times on the 4-bit model "
                        "(it does not find the defect every time)")
    args = parser.parse_args(argv)

    import openvino

    from stages import zoo_models

    from evoquant.fitness.objectives import kl_to_teacher
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.storage import CHECK_IMAGES, multistream_difference, settle_storage

    for name, bits, built, model, _, (x_heldout, y_heldout) in zoo_models("gan", args.models, "4", "evoquant-storage-"):
        images = np.ascontiguousarray(x_heldout, dtype=np.float32)
        teacher = infer(compile_ir(read_ir(built.fp32_xml), f32=True), images)

        def scores(ir, settings=None):
            outputs = infer(compile_ir(ir, settings=settings), images)
            return {"accuracy": float(np.mean(outputs[0].argmax(1) == y_heldout)), "kl": float(kl_to_teacher(outputs, teacher))}

        ir = read_ir(model)
        before = {"one_stream": scores(ir), "throughput": scores(ir, {"PERFORMANCE_HINT": "THROUGHPUT"})}
        repeated = [multistream_difference(ir, images[:CHECK_IMAGES]) for _ in range(args.repeats)]
        started = time.perf_counter()
        check = settle_storage(ir, images, "auto")
        seconds = time.perf_counter() - started
        after = {"one_stream": scores(ir), "throughput": scores(ir, {"PERFORMANCE_HINT": "THROUGHPUT"})} if check.widened else None
        print(json.dumps({"benchmark": "storage_check", "model": name, "weight_bits": bits, **check.to_dict(), "check_seconds": round(seconds, 2),
                          "four_bit_heldout": before, "widened_heldout": after, "repeated_checks": repeated, "openvino": openvino.__version__.split("-")[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
