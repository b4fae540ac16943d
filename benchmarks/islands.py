"""Islands: quality at equal evaluations, and what running them on workers costs. JSON lines.

quality: refine --stages evolve of a zoo model with 1 population of G generations, 2 islands of G/2 and 4
islands of G/4 (the same number of evaluations, up to duplicates; patience off so every run spends its
budget), over seeds; held-out real digits score the result.

throughput: 2 islands (migration every 5 generations) on 1 worker in this process, on 2 loky workers and
on a local dask cluster of 2 workers; per generation after the first epoch (workers build their
evaluators then): wall seconds and the scheduling overhead (the epoch's wall time minus the slowest
island's own search time: sending tasks with the model and images, scheduling, collecting).

    python benchmarks/islands.py > benchmarks/results/islands.jsonl
    python benchmarks/islands.py --parts throughput --models bn_cnn
    python benchmarks/readme_table.py islands benchmarks/results/islands.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="residual_cnn")
    parser.add_argument("--parts", default="quality,throughput")
    parser.add_argument("--islands", default="1,2,4", help="island counts for the quality part")
    parser.add_argument("--generations", type=int, default=60, help="generations of the single population (N islands get G/N each)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--source", choices=["gan", "fractal"], default="fractal")
    args = parser.parse_args()

    import nncf
    import openvino

    from evoquant import RefineConfig, refine, zoo
    from evoquant.demo import calibration_images, resolve_models, synthetic_source
    from evoquant.fitness.parallel import cluster_backend

    spec = synthetic_source(args.source, progress=False, echo=lambda *_: None)
    calibration = calibration_images(spec)
    _, _, x_heldout, y_heldout = zoo.mnist_split()
    versions = {"openvino": openvino.__version__.split("-")[0], "nncf": nncf.__version__}
    parts = args.parts.split(",")
    for name in resolve_models(args.models):
        built = zoo.build(name, calibration=calibration)
        base = RefineConfig.from_yaml("default").replace(stages="evolve", progress=False, data=spec)
        if "quality" in parts:
            for islands in (int(n) for n in args.islands.split(",")):
                for seed in (int(s) for s in args.seeds.split(",")):
                    config = base.replace(search={"islands": islands, "generations": args.generations // islands, "seed": seed, "migration_interval": 5})
                    config = _no_patience(config)
                    started = time.perf_counter()
                    result = refine(built.int8_xml, reference=built.fp32_xml, heldout=(x_heldout, y_heldout), config=config)
                    print(json.dumps({
                        "benchmark": "islands", "part": "quality", "model": name, "source": args.source, "islands": islands,
                        "generations_per_island": args.generations // islands, "seed": seed, "evaluations": result.evaluations,
                        "wall_seconds": round(time.perf_counter() - started, 1),
                        "int8_kl": result.heldout_before.kl, "refined_kl": result.heldout_after.kl,
                        "int8_accuracy": result.heldout_before.accuracy, "refined_accuracy": result.heldout_after.accuracy,
                        "verification_before": result.verification_before.fitness, "verification_after": result.verification_after.fitness, **versions,
                    }), flush=True)
        if "throughput" in parts:
            for label, jobs, backend in (("1 worker (this process)", 1, "loky"), ("2 loky workers", 2, "loky"), ("2 dask workers (local cluster)", 2, "dask")):
                config = _no_patience(base.replace(jobs=jobs, backend=backend, search={"islands": 2, "generations": 20, "migration_interval": 5, "seed": 0}))
                with cluster_backend(backend):
                    result = refine(built.int8_xml, reference=built.fp32_xml, config=config)
                islands = result.stages[-1].details["islands"]
                print(json.dumps({
                    "benchmark": "islands", "part": "throughput", "model": name, "workers": label, "jobs": jobs, "backend": backend, "islands": 2,
                    "seconds_per_generation": islands["seconds_per_generation"], "overhead_per_generation": islands["overhead_per_generation"],
                    "overhead_share": islands["overhead_per_generation"] / islands["seconds_per_generation"], "first_epoch_seconds": islands["epochs"][1]["wall"],
                    "search_seconds": result.search_seconds, "evaluations": result.evaluations, **versions,
                }), flush=True)
    return 0


def _no_patience(config):
    import dataclasses

    return dataclasses.replace(config, search=dataclasses.replace(config.search, patience=None))


if __name__ == "__main__":
    sys.exit(main())
