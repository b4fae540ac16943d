"""Data-free synthetic data (DFQ: data-free quantization) from the FP32 model itself: ZeroQ, Genie, GDFQ, Qimera, ClusterQ.

    >>> import evoquant
    >>> evoquant.datafree("fp32.pt2", method="clusterq", output="gen/")      # then --data gan:gen/
    >>> evoquant.datafree("fp32.pt2", method="genie", output="genie.npz", n=3072)      # then --data genie.npz

See :mod:`evoquant.dfq.synthesis` for what each method does and :mod:`evoquant.dfq.teacher` for
how the model's BatchNorm statistics are read.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evoquant.dfq.synthesis import DEFAULT_IMAGES, GENERATOR_METHODS, IMAGE_METHODS, METHODS, MethodOptions
from evoquant.dfq.teacher import Teacher, export_program, load_teacher
from evoquant.errors import EvoquantError

__all__ = ["datafree", "DataFreeResult", "MethodOptions", "METHODS", "Teacher", "load_teacher", "export_program"]


@dataclass(frozen=True)
class DataFreeResult:
    """What ``datafree`` wrote: a generator directory (``--data gan:OUTPUT``) or an .npz (ZeroQ, Genie)."""

    method: str
    output: str
    kind: str  # "generator" or "npz"
    num_classes: int
    image_shape: tuple[int, int, int]
    steps: int
    seconds: float
    images: int | None = None  # ZeroQ, Genie: images written
    samples: str | None = None  # generators: the sample grid
    mixes: int | None = None  # Genie: batches made per optimised batch from mixes of its latents
    bns: str = "absolute"  # the BatchNorm-statistics loss it was made with: absolute or relative

    @property
    def data_spec(self) -> str:
        """How to use the result as ``--data`` / ``--calibration``."""
        return f"gan:{self.output}" if self.kind == "generator" else self.output


def datafree(
    teacher: Any,
    *,
    method: str,
    output: str | os.PathLike,
    input_shape: tuple[int, ...] | str | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    mean_values: tuple[float, ...] | str | None = None,
    scale_values: tuple[float, ...] | str | None = None,
    grey: bool = False,
    n: int | None = None,
    steps: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    mixes: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    checkpoint_every: int = 250,
    options: MethodOptions | None = None,
    progress: bool = True,
) -> DataFreeResult:
    """Synthesize calibration and fitness data from an FP32 classifier with BatchNorm layers, no real image.

    Args:
        teacher: a ``torch.export`` program file (``.pt2``, saved with ``torch.export.save``), an
            ``ExportedProgram``, or an ``nn.Module`` (exported here; give ``input_shape``).
        method: ``zeroq`` or ``genie`` (an .npz of optimised images with the model's labels), or ``gdfq``,
            ``qimera``, ``clusterq`` (a generator directory, used as ``gan:OUTPUT``).
        output: the .npz (ZeroQ, Genie) or the generator directory to write.
        input_shape: the model's input (C, H, W) or (1, C, H, W) (default: the program's).
        value_range, mean_values, scale_values: how images in [0, 1] become the model's input (the range
            map, then (x - mean) / scale per channel, as ``ovc`` spells them); images are written in [0, 1]
            as every evoquant source, so give the same settings to quantize and refine.
        grey: the model is fed one grey image repeated over its channels (grey digits, X-rays or scanned
            pages given to an RGB network): synthesise one channel, repeated over the model's while
            optimising, and write one-channel images or a one-channel generator (the ``gan:`` and .npz
            sources repeat it over the model's channels as they repeat any grey source).
        n: ZeroQ's and Genie's number of images (default 3,072: what default refine fits on and verifies on).
        steps: optimisation steps per batch (ZeroQ 500, Genie 200), or the generator's training steps (1,500).
        mixes: Genie: batches made per optimised batch on top of it, by its generator from mixes of its
            latents (``1 + mixes`` times the images per optimisation; default 3: a quarter of the time, about
            as good for refine on the zoo; 0: every image optimised).
        resume: continue from the checkpoint (generators) or the finished batches (ZeroQ, Genie) in ``output``.
        options: the generator methods' settings (:class:`MethodOptions`, the papers' values by default);
            ZeroQ and Genie take only its ``bns`` and ``swing`` (the rest is refused: they have no generator to set).
            ``bns`` not given: Genie's statistics loss is the relative one, every other method's the papers'
            absolute one (``evoquant.dfq.synthesis.DEFAULT_BNS``).

    Raises:
        EvoquantError: a teacher that is not a torch.export program, has no BatchNorm layers, does not take
            ``input_shape`` or is not a classifier; bad settings; an output in the way.
    """
    from evoquant.dfq.synthesis import DEFAULT_STEPS, distilled_images, resolve_mixes, teacher_digest, train_generator

    if method not in METHODS:
        raise EvoquantError(f"unknown data-free method {method!r}; choose {', '.join(METHODS)}")
    mixes = resolve_mixes(method, mixes)
    options = (options or MethodOptions()).resolved(method)
    shape = _image_shape(input_shape)
    output = Path(output)
    started = time.perf_counter()
    if method in IMAGE_METHODS:
        if dataclasses.replace(options, bns=MethodOptions.bns, swing=MethodOptions.swing) != MethodOptions():
            raise EvoquantError(f"{method} optimises images directly: the generator settings (--set, except bns and swing) apply to {', '.join(GENERATOR_METHODS)}")
        if output.suffix.lower() != ".npz":
            raise EvoquantError(f"{method} writes images: the output must be an .npz path, got {output}")
        if output.exists() and not (resume or overwrite):
            raise EvoquantError(f"{output} exists; use --overwrite to replace it (or --resume to finish an interrupted run)")
        from evoquant.paths import check_outputs, staged

        check_outputs({"-o": output}, [teacher] if isinstance(teacher, (str, os.PathLike)) else [])
        partial = output.with_name(f".{output.name}.partial.npz")
        if overwrite and not resume:
            partial.unlink(missing_ok=True)
    elif output.suffix.lower() == ".npz":
        raise EvoquantError(f"{method} trains a generator: the output is a directory (then --data gan:{output.with_suffix('')}), not an .npz")
    from evoquant.data.preprocess import parse_values

    model = load_teacher(teacher, shape, value_range, parse_values(mean_values, "--mean-values"), parse_values(scale_values, "--scale-values"), grey=grey)
    if method in IMAGE_METHODS:
        n = DEFAULT_IMAGES if n is None else n
        images, labels = distilled_images(model, n, method=method, steps=steps, batch_size=batch_size, seed=seed, progress=progress, partial=partial, mixes=mixes,
                                          bns=options.bns, swing=options.swing)
        with staged(output) as temporary:
            np.savez(temporary, x=images, y=labels)
        partial.unlink(missing_ok=True)
        return DataFreeResult(method, str(output), "npz", model.num_classes, model.image_shape, DEFAULT_STEPS[method] if steps is None else steps,
                              time.perf_counter() - started, images=len(images), mixes=mixes, bns=options.bns)
    if n is not None:
        raise EvoquantError(f"-n is the number of images of {' and '.join(IMAGE_METHODS)}; {method} trains a generator (draw any number from gan:{output})")
    identity = teacher_digest(teacher) if isinstance(teacher, (str, os.PathLike)) else "module"
    trained = train_generator(model, method, out_dir=output, steps=steps, batch_size=batch_size, seed=seed, resume=resume, overwrite=overwrite,
                              progress=progress, checkpoint_every=checkpoint_every, options=options, teacher_id=identity)
    return DataFreeResult(method, str(output), "generator", model.num_classes, model.image_shape, trained.steps, time.perf_counter() - started,
                          samples=trained.samples, bns=options.bns)


def _image_shape(input_shape) -> tuple[int, int, int] | None:
    """(C, H, W) from (C, H, W), (1, C, H, W), or a string of either."""
    if input_shape is None:
        return None
    if isinstance(input_shape, str):
        from evoquant.ir.runtime import parse_input_shape

        input_shape = parse_input_shape(input_shape)
    dims = [int(d) for d in input_shape]
    if len(dims) == 4:
        dims = dims[1:]
    if len(dims) != 3 or min(dims) < 1:
        raise EvoquantError(f"the input shape must be C,H,W or 1,C,H,W, got {input_shape}")
    return tuple(dims)
