"""What stopping a compose search that finds nothing early would cost and save: one JSON line per recorded run.

Reads ``benchmarks/stages.py`` rows (each carries the compose stage's per-generation history: the best
fitness and the elapsed seconds) of runs made with scouting off (``--compose '{scout_generations: 0}'``)
and replays the rule ``compose.scout_generations`` / ``compose.scout_gain``: at generation K, stop when the
best genome is not better than the best uniform genome by the relative gain X. The ES is deterministic for
a seed, so a run with the rule on is the replayed prefix: the row says where it would stop, how much worse
the best genome is there than at the end (on the selection images), what the full run's composition did
against the reconstruction on the held-out digits, and the seconds saved.

``--min-improvement`` (with ``--patience``) also replays the patience rule with that threshold: a
generation whose best improves on the best so far by less than this (relative) counts as stale, and
``patience`` stale generations in a row stop the search ("converged"). A larger threshold only stops
earlier than the recorded run's (1e-4), so the replay is again a prefix; the row's ``stops_at`` is the
earlier of the two rules, ``stopped_by`` which.

    python benchmarks/stages.py --models families --bits 4,8 --source gan --stages reconstruct,compose \\
        --compose '{scout_generations: 0}' --seeds 0 > runs.jsonl
    python benchmarks/compose_scout.py runs.jsonl --generations 6 --gain 0.02 > benchmarks/results/compose_scout.jsonl
    python benchmarks/compose_scout.py benchmarks/results/compose_history.jsonl --min-improvement 0.01
"""

from __future__ import annotations

import argparse
import json
import sys


def patience_stop(best: list[float], patience: int, min_improvement: float) -> int | None:
    """The generation at which the patience rule stops a search whose best after each generation is ``best``
    (the search's own :class:`~evoquant.search.strategy.Termination`, fed the same values)."""
    from evoquant.config import ComposeConfig
    from evoquant.search.strategy import Termination

    termination = Termination(ComposeConfig(patience=patience, min_improvement=min_improvement))
    for generation, value in enumerate(best):
        termination.update(value)
        if termination.stale >= patience:
            return generation
    return None


def replay(row: dict, generations: int, gain: float, patience: int = 6, min_improvement: float | None = None) -> dict:
    compose = row["compose"]
    history = compose["history"]
    best = [step["best"] for step in history]
    uniform = min(compose["uniform_selection"].values())
    stop = next((g for g, value in enumerate(best) if g >= generations and value > (1 - gain) * uniform), None)
    stopped_by = None if stop is None else "no gain"
    if min_improvement is not None:
        converged = patience_stop(best, patience, min_improvement)
        if converged is not None and converged < len(best) - 1 and (stop is None or converged < stop):
            stop, stopped_by = converged, "converged"
    heldout = row.get("stage_heldout_kl") or {}
    out = {"benchmark": "compose_scout", "model": row["model"], "weight_bits": row["weight_bits"], "source": row.get("source"), "seed": row.get("seed"),
           "scout_generations": generations, "scout_gain": gain, "generations_run": len(history) - 1, "stop_reason": compose.get("stop_reason"),
           "selection_gain": best[-1] / uniform - 1, "search_seconds": compose.get("search_seconds"),
           "heldout_compose_vs_reconstruct": (heldout["compose"] / heldout["reconstruct"] - 1) if heldout.get("compose") and heldout.get("reconstruct") else None,
           "chosen_stage": row.get("chosen_stage"), "stops_at": stop, "stopped_by": stopped_by}
    if min_improvement is not None:
        out.update(patience=patience, min_improvement=min_improvement)
    if stop is not None:
        out["selection_at_stop_vs_end"] = best[stop] / best[-1] - 1
        out["seconds_saved"] = round(history[-1]["elapsed"] - history[stop]["elapsed"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="stages.py JSON lines with compose histories")
    parser.add_argument("--generations", type=int, default=6)
    parser.add_argument("--gain", type=float, default=0.02)
    parser.add_argument("--patience", type=int, default=6)
    parser.add_argument("--min-improvement", type=float, default=None, help="also replay patience with this relative threshold")
    args = parser.parse_args(argv)
    for path in args.rows:
        with open(path) as handle:
            for line in handle:
                row = json.loads(line)
                if "history" in (row.get("compose") or {}):
                    print(json.dumps(replay(row, args.generations, args.gain, args.patience, args.min_improvement)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
