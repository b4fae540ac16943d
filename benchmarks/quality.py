"""Refinement quality on the zoo: one JSON line per (source, GAN instance, model, weight bits, search seed).

For each zoo model -- the classic four at 1x28x28 and the families (ResNet-18, MobileNetV3-small, ViT at
3x32x32, saved as users save them) -- NNCF quantizes the FP32 IR at W8A8 and W4A8, calibrated on 300
synthetic images (GAN or fractal), and ``evoquant.refine`` runs with the default settings on the same
synthetic source only. Held-out: 1,000 real MNIST digits (padded to 32x32 in three channels for the
families), never used for calibration or selection: accuracy, top-1 agreement with FP32 and KL(FP32‖model)
(normalized MSE for the autoencoder) for FP32, NNCF and refined; wall time. Every search seed is a separate
refine (the default stages, ranges and reconstruct, draw no random numbers: one seed; with ``--preset
thorough`` the search stages do); every GAN instance is a separately trained GAN (``--gan-seeds``), which
changes both NNCF's calibration and refine's data.

    python benchmarks/quality.py > benchmarks/results/quality.jsonl                  # all, W8A8+W4A8, GAN
    python benchmarks/quality.py --gan-seeds 1 >> benchmarks/results/quality.jsonl   # a second GAN instance
    python benchmarks/quality.py --source fractal >> benchmarks/results/quality.jsonl
    python benchmarks/quality.py --preset thorough --seeds 0,1,2 --models families --bits 4   # the search stages, over seeds
    python benchmarks/readme_table.py quality benchmarks/results/quality.jsonl
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name and widest vector extension (what torch's and oneDNN's kernels dispatch on)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "unknown")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = next((isa for isa in ("amx_tile", "avx512f", "avx2") if isa in flags), "sse")
    return f"{name} ({widest})"


def zoo_instance(fp32_xml) -> dict:
    """Which zoo model a row scored: the zoo and the GAN are trained on the machine that runs the benchmark,
    and another CPU trains other instances (measured: bn_cnn FP32 98.1 vs 98.3 %)."""
    from evoquant.paths import file_digest

    return {"cpu": cpu_name(), "fp32_bin_sha256": file_digest(Path(fp32_xml).with_suffix(".bin"))[:12]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all", help="zoo models or groups: classic, families, all (default: %(default)s)")
    parser.add_argument("--bits", default="8,4", help="weight bits, comma-separated (default: %(default)s)")
    parser.add_argument("--source", default="gan", help="synthetic calibration and fitness data: gan, fractal or both comma-separated (default: %(default)s)")
    parser.add_argument("--seeds", default="0", help="refine (search) seeds, comma-separated (default: %(default)s)")
    parser.add_argument("--gan-seeds", default="0", help="GAN instances (training seeds), comma-separated (default: %(default)s)")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant.config import RefineConfig

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from stages import zoo_models, zoo_refine

    config = RefineConfig.from_yaml(args.preset)
    seeds = [int(s) for s in args.seeds.split(",")]
    for source in (s.strip() for s in args.source.split(",")):
        gan_seeds = [int(s) for s in args.gan_seeds.split(",")] if source == "gan" else [0]
        for gan_seed in gan_seeds:
            for name, bits, built, model, spec, heldout in zoo_models(source, args.models, args.bits, "evoquant-quality-", gan_seed=gan_seed):
                for seed in seeds:
                    started = time.perf_counter()
                    result = zoo_refine(model, built, spec, heldout, config=config, seed=seed, jobs=args.jobs)
                    wall = time.perf_counter() - started
                    row = {
                        "benchmark": "quality", "model": name, "weight_bits": bits, "source": source,
                        "gan_seed": gan_seed if source == "gan" else None, "seed": seed, "preset": args.preset,
                        "saved_as": built.meta.get("saved_as", "zoo"), "input_shape": built.meta.get("input_shape"),
                        "objective": result.objective, "chosen_stage": result.chosen_stage, "improved": result.improved,
                        "evaluations": result.evaluations, "shifted_weights": result.shifted_weights, "total_weights": result.total_weights,
                        "stage_seconds": {stage.name: round(stage.seconds, 1) for stage in result.stages},
                        # each stage's own result, written or not: on the verification images and held out
                        "stage_verification_kl": {stage.name: stage.verification.kl for stage in result.stages},
                        "stage_heldout_kl": {stage.name: stage.heldout.kl for stage in result.stages},
                        "stage_heldout_mse": {stage.name: stage.heldout.mse for stage in result.stages},
                        "stage_heldout_accuracy": {stage.name: stage.heldout.accuracy for stage in result.stages},
                        "compose": next(({key: stage.details.get(key) for key in ("layers_per_fit", "equivalent_fits", "uniform_selection", "selection_before", "selection_after", "evaluations", "raced", "batch_size", "stop_reason",
                                                                                       "scout_check", "fit_seconds", "search_seconds", "history")}
                                         for stage in result.stages if stage.name == "compose"), None),
                        "ranges": next(({key: stage.details.get(key) for key in ("chosen", "quantizers", "widened", "factor_median", "factor_max", "trials")}
                                        for stage in result.stages if stage.name == "ranges"), None),
                        "wall_seconds": round(wall, 1),
                        # what refine takes without --heldout: the wall time less its held-out scoring (report only)
                        "heldout_seconds": round(result.heldout_seconds, 1),
                        "refine_seconds": round(wall - result.heldout_seconds, 1),
                        "openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__,
                        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                        **zoo_instance(built.fp32_xml),
                    }
                    for label, metrics in (("fp32", result.heldout_reference), ("int8", result.heldout_before), ("refined", result.heldout_after)):
                        row[f"{label}_accuracy"] = metrics.accuracy
                        row[f"{label}_agreement"] = metrics.agreement
                        row[f"{label}_kl"] = metrics.kl
                        row[f"{label}_mse"] = metrics.mse
                    row["verification_kl_int8"] = result.verification_before.kl
                    row["verification_kl_refined"] = result.verification_after.kl
                    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
