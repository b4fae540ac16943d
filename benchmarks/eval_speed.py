"""Fitness evaluation speed and fidelity: plain path vs full forward vs the suffix engine. JSON lines.

For each model, over the same candidates (grouped as the strategy makes them with ``offspring_groups``:
a few parents, each candidate = its parent plus a 3 % shift of one tensor) and the same batch:

  (a) plain:   patch constants, compile, infer (what refine did before the engine)
  (b) forward: one forward of an already compiled INT8 model per candidate, no compile (the bound for
               any evaluator that recomputes everything)
  (c) engine:  the suffix engine (evoquant.fitness.engine)
  bound:       each candidate costs only the run of its layer's suffix (no compile, no probe, no plain
               fallback): the ceiling of the suffix design, however candidates are grouped

It prints evaluations/s of each, c/a and c/b, the engine's fidelity against (a) (Spearman rank
correlation, same best candidate, max relative fitness error), the share of layers the engine serves
exactly, peak memory, and (a) and (c) again with --jobs 2 (for (c): the engine above plans, two workers run
the groups, each with its own engine built from the planner's layer decisions). Run:

    python benchmarks/eval_speed.py                     # bn_cnn and a 19-layer residual model
    python benchmarks/eval_speed.py --models bn_cnn --groups 13 --per-group 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time

import numpy as np


def register_deep_residual() -> None:
    """A deeper ResNet for MNIST (stem + 8 basic blocks, >= 15 quantized layers), added to the zoo registry."""
    from evoquant import zoo

    if "deep_residual_cnn" in zoo.REGISTRY:
        return

    @zoo.register_model("deep_residual_cnn", epochs=3)
    def _deep_residual_cnn():
        nn = zoo._import_torch().nn
        block = zoo._residual_block_class()
        return nn.Sequential(
            zoo._conv_bn_relu(nn, 1, 16),
            block(16, 16), block(16, 16), block(16, 16),
            block(16, 32, stride=2), block(32, 32), block(32, 32),
            block(32, 64, stride=2), block(64, 64),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )


def spearman(a, b) -> float:
    ranks = lambda x: np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)  # noqa: E731
    ra, rb = ranks(np.asarray(a)), ranks(np.asarray(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def make_candidates(table, groups: int, per_group: int, seed: int):
    from evoquant.search.genome import Genome, SearchSpace
    from evoquant.search.operators import mutate_random, pick_tensors

    space = SearchSpace.from_weights(table)
    rng = np.random.default_rng(seed)
    parents = [mutate_random(Genome(), space, rng, fraction=0.03, tensors=3) for _ in range(4)]
    candidates, tensors = [], []
    for g in range(groups):
        parent = parents[g % len(parents)]
        tensor = int(pick_tensors(space, rng, 1)[0])
        candidates += [mutate_random(parent, space, rng, fraction=0.03, tensors=1, only=tensor).payload() for _ in range(per_group)]
        tensors += [tensor] * per_group
    return [p.payload() for p in parents], candidates, tensors


def suffix_run_seconds(engine, tensors: list[int], extra: int = 8) -> float:
    """Mean seconds per candidate if each cost only the run of its layer's suffix: compiled beforehand, the
    parent's activations cached, every layer served (also those the engine leaves to the plain path). The
    ceiling of the suffix design, whatever the grouping. Per layer, the marginal cost of a candidate in a
    group (a group of 1 + ``extra`` against a group of 1, median of 3), timed on the start genome in the form
    the engine uses for the layer (shared or per parent)."""
    from evoquant.search.genome import payload_key

    start = payload_key({})

    def seconds(tensor: int, n: int) -> float:
        started = time.perf_counter()
        engine._suffix_outputs(start, tensor, [{}] * n)
        return time.perf_counter() - started

    per_layer = {}
    for tensor in sorted(set(tensors)):
        seconds(tensor, 1)  # compile and probe, not timed
        per_layer[tensor] = float(np.median([max(seconds(tensor, 1 + extra) - seconds(tensor, 1), 0.0) / extra for _ in range(3)]))
    return float(np.mean([per_layer[t] for t in tensors]))


def fitness_context(name: str, batch: int, threads: int):
    """The zoo model ``name`` (built if needed) and its fitness context on ``batch`` fractal images."""
    from evoquant import zoo
    from evoquant.data import load_source
    from evoquant.demo import calibration_images
    from evoquant.fitness.evaluator import FitnessContext
    from evoquant.ir.runtime import compile_ir, infer, read_ir

    built = zoo.build(name, calibration=calibration_images())
    images = load_source("fractal").sample(batch, zoo.INPUT_SHAPE, seed=1234).images
    teacher = infer(compile_ir(read_ir(built.fp32_xml), f32=True), images)
    objective = "kl" if built.task == "classification" else "mse"
    return built, FitnessContext(str(built.int8_xml), images, teacher, None, objective, threads)


def measure(name: str, groups: int, per_group: int, batch: int) -> dict:
    from functools import partial
    from pathlib import Path
    import tempfile

    from evoquant.fitness.engine import SuffixEngine, run_in_worker
    from evoquant.fitness.evaluator import PlainEvaluator, evaluate_in_worker, save_context
    from evoquant.fitness.parallel import ParallelMap, threads_per_job
    from evoquant.ir.runtime import compile_ir

    _, context = fitness_context(name, batch, threads_per_job(1))
    plain = PlainEvaluator(context)
    parents, candidates, tensors = make_candidates(plain.table, groups, per_group, seed=0)

    started = time.perf_counter()
    plain_scores = [plain(c) for c in candidates]
    plain_rate = len(candidates) / (time.perf_counter() - started)

    compiled = compile_ir(plain.model)
    request = compiled.create_infer_request()
    started = time.perf_counter()
    for _ in candidates:
        request.infer({0: context.images})
    forward_rate = len(candidates) / (time.perf_counter() - started)

    setup_started = time.perf_counter()
    engine = SuffixEngine(context)
    setup_seconds = time.perf_counter() - setup_started
    for parent in parents:
        engine._remember(parent)
    started = time.perf_counter()
    engine_scores = engine.evaluate_many(candidates)
    engine_rate = len(candidates) / (time.perf_counter() - started)
    stats = dict(vars(engine.stats))

    with tempfile.TemporaryDirectory() as workdir, ParallelMap(2, "loky") as parallel_map:
        context2 = dataclasses.replace(context, threads=threads_per_job(2))
        function = partial(evaluate_in_worker, save_context(context2, Path(workdir) / "context.pkl"))
        parallel_map(function, candidates[:4])  # warm the workers (model read once per worker)
        started = time.perf_counter()
        jobs2_scores = parallel_map(function, candidates)
        plain_jobs2_rate = len(candidates) / (time.perf_counter() - started)

        # (c) on two workers: a fresh planner (no set-up checks: the engine's decisions) knows the parents;
        # the workers build their engines on the first items (timed apart, as refine's set-up).
        planner = SuffixEngine(context2, layers=engine.layers)
        worker = partial(run_in_worker, save_context(context2, Path(workdir) / "engine_context.pkl"), engine.layers, 512.0)
        started = time.perf_counter()
        parallel_map(worker, parents[:2])
        worker_setup_seconds = time.perf_counter() - started
        for parent in parents:
            planner._remember(parent)
        started = time.perf_counter()
        engine_jobs2_scores = planner.evaluate_many(candidates, map_items=lambda items: parallel_map(worker, items))
        engine_jobs2_rate = len(candidates) / (time.perf_counter() - started)

    bound_rate = 1.0 / suffix_run_seconds(engine, tensors)
    plain_scores, engine_scores = np.asarray(plain_scores), np.asarray(engine_scores)
    return {
        "benchmark": "eval_speed",
        "model": name,
        "quantized_layers": len(plain.table),
        "candidates": len(candidates),
        "groups": groups,
        "per_group": per_group,
        "batch": batch,
        "plain_per_s": round(plain_rate, 2),
        "forward_per_s": round(forward_rate, 2),
        "engine_per_s": round(engine_rate, 2),
        "c_over_a": round(engine_rate / plain_rate, 2),
        "c_over_b": round(engine_rate / forward_rate, 2),
        "engine_setup_s": round(setup_seconds, 2),
        "suffix_bound_per_s": round(bound_rate, 2),
        "suffix_bound_over_a": round(bound_rate / plain_rate, 2),
        "suffix_bound_over_b": round(bound_rate / forward_rate, 2),
        "spearman": round(spearman(plain_scores, engine_scores), 5),
        "same_best": bool(np.argmin(plain_scores) == np.argmin(engine_scores)),
        "max_relative_error": float(np.max(np.abs(engine_scores - plain_scores) / np.abs(plain_scores))),
        "exact_layers": len(engine.exact_layers),
        "shared_layers": stats["shared_layers"],
        "engine_suffix_evaluations": stats["suffix_evaluations"],
        "engine_plain_evaluations": stats["plain_evaluations"],
        "engine_compiles": stats["suffix_compiles"] + stats["probe_compiles"],
        "engine_cache_mb": round(stats["peak_cache_bytes"] / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "plain_jobs2_per_s": round(plain_jobs2_rate, 2),
        "jobs2_matches_jobs1": bool(np.array_equal(np.asarray(jobs2_scores), plain_scores)),
        "engine_jobs2_per_s": round(engine_jobs2_rate, 2),
        "engine_jobs2_worker_setup_s": round(worker_setup_seconds, 2),
        "engine_jobs2_matches_jobs1": bool(np.array_equal(np.asarray(engine_jobs2_scores), engine_scores)),
        "engine_jobs2_max_relative_difference": float(np.max(np.abs(np.asarray(engine_jobs2_scores) - engine_scores) / np.abs(engine_scores))),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="bn_cnn,deep_residual_cnn")
    parser.add_argument("--groups", type=int, default=13, help="(parent, tensor) groups")
    parser.add_argument("--per-group", type=int, default=8, help="candidates per group")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    register_deep_residual()
    for name in args.models.split(","):
        print(json.dumps(measure(name.strip(), args.groups, args.per_group, args.batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
