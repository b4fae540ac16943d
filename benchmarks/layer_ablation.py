"""Which layers of a reconstruction help or hurt end to end: one JSON line per subset of solved layers.

Refine runs ``--stages reconstruct`` on a zoo model (NNCF calibrated on 300 images of the source, as in
``benchmarks/quality.py``); the reconstruction's states are then applied to subsets of its layers -- none,
all, the first k of them in graph order, the last one or two, and each layer alone -- and every such model
is scored with plain OpenVINO against the FP32 reference on 1,000 held-out real digits and on 1,000 other
images of the source (KL(FP32‖model), accuracy). Deterministic: no seeds.

    python benchmarks/layer_ablation.py --model mobilenet_v3_small --bits 8 > benchmarks/results/layer_ablation.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v3_small", help="a zoo model (default: %(default)s)")
    parser.add_argument("--bits", type=int, default=8, help="weight bits (default: %(default)s)")
    parser.add_argument("--source", choices=["gan", "fractal"], default="gan")
    args = parser.parse_args()

    from evoquant.api import _write_states
    from evoquant.data.registry import load_source
    from evoquant.fitness.objectives import kl_to_teacher
    from evoquant.ir.runtime import compile_ir, infer, read_ir
    from evoquant.ir.weights import find_quantized_weights

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stages import zoo_models, zoo_refine

    work = Path(tempfile.mkdtemp(prefix="evoquant-ablation-"))
    for name, bits, built, model, spec, (x_heldout, y_heldout) in zoo_models(args.source, args.model, str(args.bits), "evoquant-ablation-"):
        run = work / "run"
        zoo_refine(model, built, spec, (x_heldout, y_heldout), stages="reconstruct", run_dir=run)
        with np.load(run / "reconstruct.npz") as archive:
            states = {int(key[1:]): archive[key] for key in archive.files if key.startswith("t")}
        original = read_ir(model)
        table = find_quantized_weights(original)
        synthetic = load_source(spec).sample(1000, tuple(x_heldout.shape[1:]), seed=777).images
        teacher = compile_ir(read_ir(built.fp32_xml), f32=True)
        teacher_heldout, teacher_synthetic = infer(teacher, x_heldout), infer(teacher, synthetic)

        def score(subset: dict, label: str) -> None:
            compiled = compile_ir(read_ir(_write_states(original, table, subset, work / "candidate.xml")))
            heldout, other = infer(compiled, x_heldout), infer(compiled, synthetic)
            print(json.dumps({
                "benchmark": "layer_ablation", "model": name, "weight_bits": bits, "source": args.source, "subset": label,
                "layers": len(subset), "heldout_kl": kl_to_teacher(heldout, teacher_heldout), "synthetic_kl": kl_to_teacher(other, teacher_synthetic),
                "accuracy": float(np.mean(np.argmax(heldout[0], axis=1) == y_heldout)),
            }), flush=True)

        order = sorted(states)
        count = len(order)
        score({}, "none")
        score(states, "all")
        for cut in sorted({count // 4, count // 2, 3 * count // 4, count - 2, count - 1} - {0, count}):
            score({i: states[i] for i in order[:cut]}, f"first {cut} of {count}")
        for cut in (2, 1):
            score({i: states[i] for i in order[count - cut:]}, f"last {cut}")
        for i in order:
            score({i: states[i]}, f"only {table[i].consumer}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
