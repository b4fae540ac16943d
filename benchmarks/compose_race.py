"""How often racing in the compose stage would stop a child that should have entered the parents, and what
it saves: one JSON line per (model, bits, racing margin).

Refine runs with the default stages, every child scored on every compose image (racing margin infinite)
while its score on the racing subset (``compose.race_images``, the first images of a seeded shuffle) is
recorded. A (mu + lambda) ES that never re-scores a genome keeps as parents the mu best genomes scored so
far, so each child's fate is known: with margin m it would have stopped on the subset when its subset
score exceeds (1 + m) x the worst parent's; a *false stop* is such a child whose full score beats the worst
parent's (it would have entered). Saved: the share of children stopped (each costs its compile and the
subset's inference instead of the whole batch's).

    python benchmarks/compose_race.py --models families --bits 4,8 > benchmarks/results/compose_race.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2)


def replay(batches: list[list[tuple[float, float]]], mu: int, margin: float) -> dict:
    """``batches``: per scoring call, (subset score, full score) of each genome; the first is the uniform
    genomes. Returns children seen, stopped, and falsely stopped under ``margin``."""
    scored: list[tuple[float, float]] = list(batches[0])
    children = stopped = false = 0
    for batch in batches[1:]:
        parents = sorted(scored, key=lambda pair: pair[1])[:mu]
        bound = max(subset for subset, _ in parents) * (1 + margin)
        worst = max(full for _, full in parents)
        for subset, full in batch:
            children += 1
            if subset > bound:
                stopped += 1
                false += full < worst
        scored.extend(batch)
    return {"children": children, "stopped": stopped, "false_stops": false}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="families")
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--source", choices=["gan", "fractal"], default="gan")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import evoquant.search.compose as compose_module
    from evoquant.config import RefineConfig
    from stages import zoo_models, zoo_refine

    config = RefineConfig.from_yaml("default")
    config = config.replace(compose={"race_margin": math.inf})
    original = compose_module.compose
    batches: list[list[tuple[float, float]]] = []

    def logging_compose(*positional, race=None, **keywords):
        def logged(genomes, bound):
            results = race(genomes, bound)
            batches.append([(subset, full) for full, subset in results])
            return results

        return original(*positional, race=None if race is None else logged, **keywords)

    compose_module.compose = logging_compose
    for name, bits, built, model, spec, heldout in zoo_models(args.source, args.models, args.bits, "evoquant-race-"):
        batches.clear()
        started = time.perf_counter()
        result = zoo_refine(model, built, spec, heldout, config=config, seed=args.seed)
        details = next(stage.details for stage in result.stages if stage.name == "compose")
        for margin in MARGINS:
            row = {"benchmark": "compose_race", "model": name, "weight_bits": bits, "source": args.source, "seed": args.seed,
                   "race_images": details["race_images"], "images": config.compose.images, "mu": config.compose.mu, "margin": margin,
                   **replay(batches, config.compose.mu, margin), "compose_seconds": round(details["search_seconds"], 1),
                   "wall_seconds": round(time.perf_counter() - started, 1)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
