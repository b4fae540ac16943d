"""Where a suffix's time goes: per quantized layer, its suffix run against a full INT8 forward. JSON lines.

    python benchmarks/suffix_profile.py                          # deep_residual_cnn, as in eval_speed.py
    python benchmarks/suffix_profile.py --model bn_cnn

For each layer of the start model, the suffix engine's graph for it (per parent: INT8 constants below the
cut, the cut layer's weight an f32 input) runs on the batch with the start model's activations, compiled
beforehand, as in eval_speed.py's "suffix bound". One line per layer: the suffix's run time, its share of a
full forward, the share of the forward's multiply-adds it recomputes (what an ideal engine would pay), and
the plugin's own per-op times (performance counters, summed by op type and kernel) for the suffix and the
forward, so the overhead over the ideal shows by kernel. A last line sums up over the layers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def timed_ms(compiled, inputs: dict, repeats: int) -> float:
    request = compiled.create_infer_request()
    request.infer(inputs)
    started = time.perf_counter()
    for _ in range(repeats):
        request.infer(inputs)
    return 1000 * (time.perf_counter() - started) / repeats


def kernel_ms(model, inputs: dict, threads: int, f32: bool) -> dict[str, float]:
    """Per (op type, kernel) milliseconds of one run, from the plugin's performance counters."""
    from evoquant.ir.runtime import F32_PRECISION, core

    config = {"ENABLE_CPU_PINNING": False, "INFERENCE_NUM_THREADS": threads, "PERF_COUNT": True, **(F32_PRECISION if f32 else {})}
    request = core().compile_model(model, "CPU", config).create_infer_request()
    request.infer(inputs)
    request.infer(inputs)
    totals: dict[str, float] = {}
    for entry in request.get_profiling_info():
        key = f"{entry.node_type}/{entry.exec_type}"
        totals[key] = totals.get(key, 0.0) + entry.real_time.total_seconds() * 1000
    return {k: round(v, 2) for k, v in sorted(totals.items(), key=lambda kv: -kv[1]) if v >= 0.05}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deep_residual_cnn")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from change_spread import macs
    from eval_speed import fitness_context, register_deep_residual

    from evoquant.fitness.engine import SuffixEngine
    from evoquant.fitness.parallel import threads_per_job
    from evoquant.ir.cut import build_suffix
    from evoquant.ir.runtime import compile_ir
    from evoquant.search.genome import payload_key

    register_deep_residual()
    threads = threads_per_job(1)
    _, context = fitness_context(args.model, args.batch, threads)
    images = context.images
    engine = SuffixEngine(context)
    model = engine.model
    heavy = {op.get_friendly_name(): macs(op) for op in model.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")}
    forward_ms = timed_ms(compile_ir(model, threads=threads), {0: images}, args.repeats)
    forward_kernels = kernel_ms(model, {0: images}, threads, f32=False)
    start = payload_key({})
    activations, _ = engine._parent_activations(start)
    rows = []
    for tensor, cut in enumerate(engine.cuts):
        weight = engine.table[tensor]
        inputs = {i: activations[k] for i, k in enumerate(cut.frontier)}
        inputs[len(cut.frontier)] = np.ascontiguousarray(weight.values(weight.states).astype(np.float32).reshape(cut.weight_shape))
        suffix_ms = timed_ms(engine._compiled_suffix(start, tensor), inputs, args.repeats)
        mac_share = sum(v for name, v in heavy.items() if name in cut.nodes) / sum(heavy.values())
        row = {
            "benchmark": "suffix_profile",
            "model": args.model,
            "layer": tensor,
            "consumer": weight.consumer,
            "bit_exact": tensor in engine.exact_layers,
            "frontier_inputs": len(cut.frontier),
            "suffix_ms": round(suffix_ms, 2),
            "forward_ms": round(forward_ms, 2),
            "suffix_over_forward": round(suffix_ms / forward_ms, 3),
            "mac_share": round(mac_share, 3),
            "suffix_kernels_ms": kernel_ms(build_suffix(model, weight, cut), inputs, threads, f32=True),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(json.dumps({
        "benchmark": "suffix_profile",
        "model": args.model,
        "layers": len(rows),
        "batch": args.batch,
        "forward_ms": round(forward_ms, 2),
        "mean_suffix_over_forward": round(float(np.mean([r["suffix_over_forward"] for r in rows])), 3),
        "mean_mac_share": round(float(np.mean([r["mac_share"] for r in rows])), 3),
        "forward_kernels_ms": forward_kernels,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
