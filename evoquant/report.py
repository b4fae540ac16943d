"""Human-facing output: the end-of-run table, the inspect table, JSON reports and the history plot."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path


def _number(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-2)):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def _change(before, after) -> str:
    if before is None or after is None or before == 0 or not math.isfinite(before):
        return ""
    return f"{100 * (after - before) / abs(before):+.1f}%"


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain aligned text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_refine_table(result) -> str:
    """The summary ``evoquant refine`` prints: before/after on verification and held-out data."""
    rows = []
    sets = [("verification", result.verification_before, result.verification_after, None)]
    if result.heldout_before is not None:
        sets.append(("held-out", result.heldout_before, result.heldout_after, result.heldout_reference))
    for label, before, after, reference in sets:
        if before.fitness is not None:
            rows.append([f"{label} fitness ({result.objective})", _number(before.fitness), _number(after.fitness), _change(before.fitness, after.fitness), ""])
        if before.kl is not None:
            rows.append([f"{label} KL(FP32||INT8)", _number(before.kl), _number(after.kl), _change(before.kl, after.kl), ""])
        if before.mse is not None and before.kl is None:
            rows.append([f"{label} normalized MSE", _number(before.mse), _number(after.mse), _change(before.mse, after.mse), ""])
        if before.agreement is not None:
            rows.append([f"{label} top-1 agreement", _percent(before.agreement), _percent(after.agreement), "", ""])
        if before.accuracy is not None:
            fp32 = _percent(reference.accuracy) if reference is not None else "-"
            rows.append([f"{label} accuracy", _percent(before.accuracy), _percent(after.accuracy), "", fp32])
    table = format_rows(["metric", "INT8 start", "refined", "change", "FP32"], rows)
    verdict = (
        f"refined: {result.shifted_weights} of {result.total_weights} weights moved from their starting state"
        if result.improved
        else "no improvement on the verification images: the unchanged model was kept"
    )
    stages = getattr(result, "stages", [])
    if stages:
        parts = [f"{stage.name} {stage.seconds:.1f} s (verification fitness {_number(stage.verification.fitness)}"
                 + (f", held-out KL {_number(stage.heldout.kl)}" if getattr(stage, "heldout", None) is not None and stage.heldout.kl is not None else "") + ")" for stage in stages]
        verdict += f"\nstages: {', '.join(parts)}; kept: {result.chosen_stage}'s result"
        for stage in stages:
            if stage.name == "compose" and "layers_per_fit" in stage.details:
                counts = ", ".join(f"{count} {name}" for name, count in stage.details["layers_per_fit"].items())
                raced = (f" ({stage.details['raced']} stopped after {stage.details['race_images']} images)"
                         if stage.details.get("race_images") else "")
                stopped = {"no gain": ", stopped: no better composition in the first generations",
                           "not verified": ", stopped: the composition found was no better on the verification images"}.get(stage.details.get("stop_reason"), "")
                verdict += f"\ncompose: {stage.details['evaluations']} evaluations{raced} in {stage.details['generations']} generations{stopped}; layers took: {counts}"
    footer = verdict
    if result.generations:
        footer += (
            f"\n{result.evaluations} evaluations in {result.generations} generations, "
            f"search {result.search_seconds:.1f} s, total {result.wall_seconds:.1f} s (stopped: {result.stop_reason})"
        )
    else:
        footer += f"\ntotal {result.wall_seconds:.1f} s"
    if result.selection_effective_size is not None:
        footer += f"\nfitness on {result.selection_images} images drawn by importance (effective size {result.selection_effective_size:.0f})"
    if result.engine is not None:
        e = result.engine
        footer += (
            f"\nsuffix engine: {e['suffix_evaluations']} of {e['suffix_evaluations'] + e['plain_evaluations']} candidates recomputed "
            f"below the changed layer ({e['suffix_layers']} of {e['quantized_layers']} layers, {e['shared_layers']} shared; set-up {e['setup_seconds']:.1f} s)"
        )
    if result.output:
        footer += f"\nwritten: {result.output}"
    else:
        footer += "\nnothing written (no -o given)"
    return f"{table}\n{footer}"


def format_inspect_table(weights) -> str:
    """The ``evoquant inspect`` table."""
    rows = [
        [w.index, w.consumer, w.consumer_type, w.form, w.element_type, "x".join(map(str, w.shape)), w.granularity, f"[{w.low}, {w.high}]"]
        for w in weights
    ]
    total = sum(w.size for w in weights)
    return format_rows(["#", "layer", "op", "form", "type", "shape", "scale", "states"], rows) + f"\n{len(rows)} quantized tensors, {total} weights"


def write_json(data: dict, path: str | Path) -> None:
    """Write a JSON report (NaN/inf become null so the file stays valid JSON)."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    from evoquant.paths import write_text

    write_text(path, json.dumps(clean(data), indent=2) + "\n")


def plot_history(result, path: str | Path) -> None:
    """Plot the best and mean offspring fitness per generation (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from evoquant.errors import EvoquantError

        raise EvoquantError("--plot needs matplotlib: pip install 'evoquant[plots]'") from None
    generations = [h.generation for h in result.history]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([0] + generations, [result.selection_before] + [h.best for h in result.history], label="best")
    axis.plot(generations, [h.mean for h in result.history], alpha=0.5, label="offspring mean")
    axis.set_xlabel("generation")
    axis.set_ylabel(f"fitness ({result.objective}, lower is better)")
    axis.set_yscale("log" if all(h.best > 0 for h in result.history) else "linear")
    axis.legend()
    axis.set_title(Path(result.model).name)
    figure.tight_layout()
    from evoquant.paths import staged

    try:
        with staged(path) as temporary:
            figure.savefig(temporary, dpi=120, format=Path(path).suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(figure)
