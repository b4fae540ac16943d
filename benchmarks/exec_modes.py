"""Do the zoo's quantized IRs compute the same under the CPU plugin's execution settings? One JSON line per
(model, weight bits, IR, setting).

refine scores candidates with the plugin's latency defaults (one stream, the CPU's default inference
precision: bf16 where the CPU has it), which is what ``core.compile_model(model, "CPU")`` gives. Users also
deploy with several streams (``PERFORMANCE_HINT: THROUGHPUT`` is benchmark_app's default). For each family
model, NNCF's W8A8 / W4A8 IR (calibrated on 300 GAN images, as benchmarks/quality.py does) and -- with
``--refined`` -- evoquant's reconstruct-only result of it are compiled under each setting and run on the
1,000 held-out digits: accuracy, KL(FP32 || model), and the largest logit difference from the default.
Each IR with 4-bit weights is also run "widened": the same integer states in 8-bit constants (same grid,
same scales and zero points; only the container differs), in memory.

    python benchmarks/exec_modes.py > benchmarks/results/exec_modes.jsonl
    python benchmarks/exec_modes.py --models mobilenet_v3_small --bits 4 --refined
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

SETTINGS = {
    "default": {},
    "2 streams": {"NUM_STREAMS": 2},
    "THROUGHPUT": {"PERFORMANCE_HINT": "THROUGHPUT"},
    "f32": {"INFERENCE_PRECISION_HINT": "f32"},
    "2 streams f32": {"NUM_STREAMS": 2, "INFERENCE_PRECISION_HINT": "f32"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="families")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--refined", action="store_true", help="also check refine's reconstruct-only result of each IR")
    args = parser.parse_args()

    import openvino

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stages import zoo_models, zoo_refine

    from evoquant.fitness.objectives import kl_to_teacher
    from evoquant.ir.runtime import compile_ir, core, infer, read_ir
    from evoquant.ir.storage import widen
    from evoquant.ir.weights import WEIGHTED_OPS

    for name, bits, built, model, spec, (x_heldout, y_heldout) in zoo_models("gan", args.models, args.bits, "evoquant-modes-"):
        images = np.ascontiguousarray(x_heldout, dtype=np.float32)
        teacher = infer(compile_ir(read_ir(built.fp32_xml), f32=True), images)
        irs = [("nncf", Path(model))]
        if args.refined:
            output = Path(tempfile.mkdtemp(prefix="evoquant-modes-")) / f"{name}_w{bits}_refined.xml"
            zoo_refine(model, built, spec, (x_heldout, y_heldout), stages="reconstruct", output=output)
            irs.append(("refined", output))
        variants = []
        for label, xml in irs:
            ir = read_ir(xml)
            variants.append((label, ir))
            widened = ir.clone()
            if widen(widened, layers=tuple(WEIGHTED_OPS)):  # every 4-bit weight, MatMuls too
                variants.append((f"{label} widened", widened))
        for label, ir in variants:
            default = None
            for setting, config in SETTINGS.items():
                outputs = infer(core().compile_model(ir, "CPU", {"ENABLE_CPU_PINNING": False, **config}), images)
                default = outputs[0] if default is None else default
                print(json.dumps({"benchmark": "exec_modes", "model": name, "weight_bits": bits, "ir": label, "setting": setting,
                                  "accuracy": float(np.mean(outputs[0].argmax(1) == y_heldout)), "kl": float(kl_to_teacher(outputs, teacher)),
                                  "max_logit_difference": float(np.abs(outputs[0] - default).max()), "openvino": openvino.__version__.split("-")[0]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
