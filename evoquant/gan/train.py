"""Training the compact GAN on images (``train_gan``) or black-box from a larger generator (``distill``).

Both write a generator directory (see :mod:`evoquant.gan.generator`): periodic checkpoints for
``resume``, then the exponential moving average (EMA) of the generator's weights, exported as
TorchScript and OpenVINO IR with ``generator.json``, and a ``samples.png`` grid.

Recipe (what makes a CPU budget enough):

* hinge loss, Adam with ``betas=(0, 0.9)``, one discriminator step per generator step (spectral norm
  keeps the discriminator Lipschitz, so it needs no extra steps);
* the projection discriminator for class conditioning;
* DiffAugment-style random translation of real *and* generated images before the discriminator, so a
  few thousand training images are not memorised by it (``train_gan`` only; a teacher gives unlimited
  images);
* a mode-seeking term (MSGAN) on pairs of generated images that share a label, and a minibatch
  standard-deviation channel in the discriminator: without them the conditional generator collapses to
  nearly one digit per class, which is class-correct but a poor calibration set;
* an EMA of the generator weights is what gets exported, with BatchNorm statistics re-estimated on
  the EMA weights ("standing statistics"), so eval-mode outputs match what the weights learned.

``distill`` follows DiStyleGAN: the teacher is only *run* (TorchScript, ONNX or OpenVINO IR); for the
same ``(z, label)`` the student is trained with pixel L1 to the teacher's image, L1 between the
discriminator's feature maps of the two images, and the hinge adversarial loss with the teacher's
images as the real ones.

Determinism: all randomness comes from ``seed`` (initialisation under a forked global RNG, then one
private ``torch.Generator`` for batches, latents and augmentation that is saved in every checkpoint), so
a resumed run continues the same stream of batches. The result still depends on torch's thread count
(the reduction order of CPU kernels).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from evoquant.errors import EvoquantError
from evoquant.gan.generator import META_FILE, Generator, GeneratorInfo, load_generator, meta_for, write_json_atomically
from evoquant.gan.models import create_discriminator, create_generator, import_torch
from evoquant.paths import staged

__all__ = ["TrainResult", "train_gan", "distill", "DEFAULT_STEPS", "DEFAULT_DISTILL_STEPS"]

DEFAULT_STEPS = 2500
DEFAULT_DISTILL_STEPS = 2000
DEFAULT_LATENT = 64
# Measured on the zoo digits (benchmarks/gan.py): width 16 for both gives class-correct, varied digits
# in 3000 steps on one core; wider nets cost 2-3x per step for no visible gain at 28x28.
DEFAULT_GENERATOR_WIDTH = 16
DEFAULT_DISCRIMINATOR_WIDTH = 16
CHECKPOINT_FILE = "checkpoint.pt"
SAMPLES_FILE = "samples.png"
_CHECKPOINT_VERSION = 1

_LEARNING_RATE = 2e-4
_BETAS = (0.0, 0.9)
_EMA_DECAY = 0.999
# Weight of the mode-seeking term; without it the conditional generator draws nearly the same digit for
# every z of a class (measured on the zoo digits: intra-class spread a third of the data's); at MSGAN's
# 1.0 the digits come out varied but malformed.
MODE_SEEKING_WEIGHT = 0.1
# Random translation by up to this fraction of the image side (DiffAugment's default is 1/8).
_TRANSLATE = 0.125
# Standing statistics: batches of generated images used to re-estimate BatchNorm mean/variance.
_STANDING_BATCHES = 4
_STANDING_BATCH_SIZE = 128
# DiStyleGAN-style loss weights (ours: the pixel and feature terms dominate, the adversarial term adds
# sharpness; pixel L1 of a fair student is ~0.05-0.1 in [-1, 1] units).
PIXEL_WEIGHT = 10.0
FEATURE_WEIGHT = 10.0
ADVERSARIAL_WEIGHT = 1.0


@dataclass(frozen=True)
class TrainResult:
    """What a training or distillation run wrote.

    Attributes:
        out_dir: the generator directory.
        generator: the exported generator, loaded back (its ``info`` describes it).
        steps: total steps the generator has been trained for.
        resumed_from: the step the run started from (0 for a fresh run).
        seconds: wall time of this run's training steps.
        samples: path of the sample grid PNG.
    """

    out_dir: str
    generator: Generator
    steps: int
    resumed_from: int
    seconds: float
    samples: str

    @property
    def info(self) -> GeneratorInfo:
        return self.generator.info


def train_gan(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    *,
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 64,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 500,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    latent_size: int = DEFAULT_LATENT,
    generator_width: int = DEFAULT_GENERATOR_WIDTH,
    discriminator_width: int = DEFAULT_DISCRIMINATOR_WIDTH,
    mode_seeking_weight: float = MODE_SEEKING_WEIGHT,
) -> TrainResult:
    """Train the compact GAN on ``images`` (conditional when ``labels`` are given) and export it.

    Args:
        images: float ``(N, C, H, W)`` in ``[0, 1]`` (or uint8 0..255), N >= 1; any C, H, W.
        labels: int ``(N,)`` class indices, or ``None`` for an unconditional GAN.
        out_dir: the generator directory; created if missing. It must not already hold a generator or
            a checkpoint unless ``resume`` or ``overwrite`` is set.
        steps: total training steps (a resumed run trains up to this count).
        resume: continue from ``out_dir/checkpoint.pt`` (a fresh start when there is none); the
            settings and data must be the ones the checkpoint was made with.
        overwrite: start over even when ``out_dir`` holds a generator or a checkpoint.
        checkpoint_every: steps between checkpoints (one is also written at the end).
        num_classes: number of classes (default ``labels.max() + 1``); ``class_names`` are recorded
            in the metadata.
        latent_size, generator_width, discriminator_width: the architecture (see
            :mod:`evoquant.gan.models`).
        mode_seeking_weight: weight of the mode-seeking term that keeps images of one class varied.

    Returns:
        A :class:`TrainResult`. The directory then holds ``generator.json``, ``generator.xml/.bin``,
        ``generator.pt``, ``samples.png`` and ``checkpoint.pt``.

    Raises:
        EvoquantError: bad images, labels or settings; an occupied ``out_dir``; a checkpoint that
            does not match; torch missing.
    """
    x, y, classes = _check_training_data(images, labels, num_classes)
    _check_settings(steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, latent_size=latent_size,
                    generator_width=generator_width, discriminator_width=discriminator_width)
    _check_weight("mode-seeking", mode_seeking_weight)
    settings = {
        "kind": "train",
        "latent_size": latent_size,
        "num_classes": classes,
        "image_shape": list(x.shape[1:]),
        "generator_width": generator_width,
        "discriminator_width": discriminator_width,
        "batch_size": batch_size,
        "seed": seed,
        "data": _fingerprint(x, y),
        "mode_seeking_weight": mode_seeking_weight,
    }
    out = _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    torch = import_torch()
    real = torch.from_numpy(x * np.float32(2.0) - np.float32(1.0))  # the generator's tanh range
    real_labels = torch.from_numpy(y) if y is not None else None

    shift = max(1, round(_TRANSLATE * min(x.shape[2], x.shape[3])))

    half = batch_size // 2

    def train_step(state: _State, batch_generator: Any) -> tuple[float, float]:
        idx = torch.randint(len(real), (batch_size,), generator=batch_generator)
        label = real_labels[idx] if real_labels is not None else torch.zeros(batch_size, dtype=torch.long)
        # Generated images come in pairs: the same label with two latents (the mode-seeking term below),
        # labels drawn from the data so classes keep their frequencies.
        fake_label = torch.cat([label[: batch_size - half], label[:half]])
        z = torch.randn(batch_size, latent_size, generator=batch_generator)
        fake = state.generator(z, fake_label)
        augment = lambda images: _translate(torch, images, shift, batch_generator)  # noqa: E731
        loss_d = _discriminator_step(torch, state, augment(real[idx]), augment(fake.detach()), label, fake_label)
        with _frozen(state.discriminator):
            score, _ = state.discriminator(augment(fake), fake_label)
            loss_g = -score.mean() + mode_seeking_weight * _mode_seeking(fake, z, half)
            _generator_step(state, loss_g)
        return loss_d, float(loss_g.detach())

    return _run(settings, out, train_step, steps=steps, resume=resume, progress=progress, checkpoint_every=checkpoint_every,
                extra_meta={"trained_on": {"images": int(len(x)), "class_names": class_names}}, description="gan train")


def distill(
    teacher: str | os.PathLike | Generator,
    *,
    out_dir: str | os.PathLike,
    steps: int = DEFAULT_DISTILL_STEPS,
    batch_size: int = 64,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    checkpoint_every: int = 500,
    latent_size: int | None = None,
    num_classes: int | None = None,
    value_range: tuple[float, float] | None = None,
    generator_width: int = DEFAULT_GENERATOR_WIDTH,
    discriminator_width: int = DEFAULT_DISCRIMINATOR_WIDTH,
    pixel_weight: float = PIXEL_WEIGHT,
    feature_weight: float = FEATURE_WEIGHT,
    adversarial_weight: float = ADVERSARIAL_WEIGHT,
) -> TrainResult:
    """Distill a (larger) generator into the compact one, black-box, DiStyleGAN-style.

    Args:
        teacher: a generator directory or file (TorchScript, ONNX, OpenVINO IR; inputs ``(z[, label])``)
            or a loaded :class:`Generator`. ``latent_size``, ``num_classes`` and ``value_range`` supply
            what its file does not record (see :func:`~evoquant.gan.generator.load_generator`).
        out_dir, steps, batch_size, seed, resume, overwrite, progress, checkpoint_every: as for
            :func:`train_gan`.
        generator_width, discriminator_width: the student's architecture; its latent size, classes
            and image shape are the teacher's.
        pixel_weight, feature_weight, adversarial_weight: weights of pixel L1, discriminator-feature
            L1 and the hinge adversarial term of the student's loss.

    Returns:
        A :class:`TrainResult` for the student's generator directory.

    Raises:
        EvoquantError: an unloadable teacher, bad settings, an occupied ``out_dir``, a checkpoint made
            from another teacher or with other settings; torch missing.
    """
    if isinstance(teacher, Generator):
        teacher_generator = teacher
    else:
        teacher_generator = load_generator(teacher, latent_size=latent_size, num_classes=num_classes, value_range=value_range)
    info = teacher_generator.info
    _check_settings(steps=steps, batch_size=batch_size, seed=seed, checkpoint_every=checkpoint_every, latent_size=info.latent_size,
                    generator_width=generator_width, discriminator_width=discriminator_width)
    for name, weight in (("pixel", pixel_weight), ("feature", feature_weight), ("adversarial", adversarial_weight)):
        _check_weight(name, weight)
    settings = {
        "kind": "distill",
        "latent_size": info.latent_size,
        "num_classes": info.num_classes,
        "image_shape": list(info.image_shape),
        "generator_width": generator_width,
        "discriminator_width": discriminator_width,
        "batch_size": batch_size,
        "seed": seed,
        "teacher": os.path.abspath(info.path),
        "weights": [pixel_weight, feature_weight, adversarial_weight],
    }
    out = _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    torch = import_torch()

    def distill_step(state: _State, batch_generator: Any) -> tuple[float, float]:
        z = torch.randn(batch_size, info.latent_size, generator=batch_generator)
        if info.conditional:
            label = torch.randint(info.num_classes, (batch_size,), generator=batch_generator)
            label_array = label.numpy()
        else:
            label, label_array = torch.zeros(batch_size, dtype=torch.long), None
        # The teacher's images for the same (z, label), in the student's [-1, 1] range.
        target = torch.from_numpy(teacher_generator.images01(z.numpy(), label_array) * np.float32(2.0) - np.float32(1.0))
        fake = state.generator(z, label)
        loss_d = _discriminator_step(torch, state, target, fake.detach(), label)
        with _frozen(state.discriminator):
            score, fake_features = state.discriminator(fake, label)
            with torch.no_grad():
                _, target_features = state.discriminator(target, label)
            feature = sum((f - t).abs().mean() for f, t in zip(fake_features, target_features)) / len(fake_features)
            pixel = (fake - target).abs().mean()
            loss_g = adversarial_weight * -score.mean() + pixel_weight * pixel + feature_weight * feature
            _generator_step(state, loss_g)
        return loss_d, float(loss_g.detach())

    extra = {"distilled_from": {"teacher": info.path, "teacher_format": info.format}}
    return _run(settings, out, distill_step, steps=steps, resume=resume, progress=progress, checkpoint_every=checkpoint_every,
                extra_meta=extra, description="gan distill")


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def _check_training_data(images: Any, labels: Any, num_classes: int | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    x = np.asarray(images)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    elif not np.issubdtype(x.dtype, np.floating):
        raise EvoquantError(f"training images must be float in [0, 1] or uint8, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[0] < 1 or min(x.shape[1:]) < 1:
        raise EvoquantError(f"training images must have shape (N, C, H, W), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all() or x.min() < -1e-4 or x.max() > 1 + 1e-4:
        raise EvoquantError("training images must be finite and lie in [0, 1]")
    x = np.clip(x, 0.0, 1.0)
    if labels is None:
        if num_classes:
            raise EvoquantError("num_classes was given but there are no labels")
        return x, None, 0
    y = np.asarray(labels)
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (len(x),):
        raise EvoquantError(f"labels must be {len(x)} integers (N,), got dtype {y.dtype} and shape {y.shape}")
    y = y.astype(np.int64)
    if (y < 0).any():
        raise EvoquantError("labels must be non-negative class indices")
    classes = int(y.max()) + 1 if num_classes is None else int(num_classes)
    if classes < 1 or y.max() >= classes:
        raise EvoquantError(f"labels go up to {int(y.max())} but num_classes is {classes}")
    return x, y, classes


def _check_settings(**values: int) -> None:
    minimum = {"seed": 0}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum.get(name, 1):
            raise EvoquantError(f"{name.replace('_', ' ')} must be an integer >= {minimum.get(name, 1)}, got {value!r}")


def _check_weight(name: str, weight: object) -> None:
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
        raise EvoquantError(f"the {name} weight must be a non-negative number, got {weight!r}")


def _fingerprint(x: np.ndarray, y: np.ndarray | None) -> str:
    digest = hashlib.sha256(x.tobytes())
    digest.update(str(x.shape).encode())
    if y is not None:
        digest.update(y.tobytes())
    return digest.hexdigest()[:16]


def _prepare_out_dir(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EvoquantError(f"{out} exists and is not a directory")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise EvoquantError(f"the directory {parent} does not exist")
    occupied = out.is_dir() and ((out / META_FILE).exists() or (out / CHECKPOINT_FILE).exists())
    if occupied and not (resume or overwrite):
        raise EvoquantError(f"{out} already holds a generator; use --resume to continue it or --overwrite to start over")
    out.mkdir(exist_ok=True)
    return out


# --------------------------------------------------------------------------------------------------
# The training loop
# --------------------------------------------------------------------------------------------------


@dataclass
class _State:
    generator: Any
    discriminator: Any
    ema: Any
    generator_optimizer: Any
    discriminator_optimizer: Any
    batch_generator: Any  # torch.Generator: batches, latents, augmentation
    step: int


def _new_state(torch: Any, settings: dict) -> _State:
    shape = tuple(settings["image_shape"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        generator = create_generator(latent_size=settings["latent_size"], num_classes=settings["num_classes"], image_shape=shape,
                                     width=settings["generator_width"])
        discriminator = create_discriminator(num_classes=settings["num_classes"], image_shape=shape, width=settings["discriminator_width"])
    ema = copy.deepcopy(generator).eval()
    for parameter in ema.parameters():
        parameter.requires_grad_(False)
    return _State(
        generator,
        discriminator,
        ema,
        torch.optim.Adam(generator.parameters(), lr=_LEARNING_RATE, betas=_BETAS),
        torch.optim.Adam(discriminator.parameters(), lr=_LEARNING_RATE, betas=_BETAS),
        torch.Generator().manual_seed(settings["seed"] + 1),
        0,
    )


def _save_checkpoint(torch: Any, state: _State, settings: dict, path: Path) -> None:
    payload = {
        "version": _CHECKPOINT_VERSION,
        "settings": settings,
        "step": state.step,
        "generator": state.generator.state_dict(),
        "discriminator": state.discriminator.state_dict(),
        "ema": state.ema.state_dict(),
        "generator_optimizer": state.generator_optimizer.state_dict(),
        "discriminator_optimizer": state.discriminator_optimizer.state_dict(),
        "batch_generator": state.batch_generator.get_state(),
    }
    with staged(path) as temporary:
        torch.save(payload, temporary)


def _load_checkpoint(torch: Any, settings: dict, path: Path) -> _State:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        raise EvoquantError(f"cannot read the checkpoint {path}: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(payload, dict) or payload.get("version") != _CHECKPOINT_VERSION:
        raise EvoquantError(f"{path} is not an evoquant GAN checkpoint of version {_CHECKPOINT_VERSION}")
    saved = payload["settings"]
    changed = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if changed:
        what = ", ".join(f"{key} {saved.get(key)!r} -> {settings.get(key)!r}" for key in changed)
        raise EvoquantError(f"the checkpoint in {path.parent} was made with other settings or data ({what}); "
                            "use the same ones, or --overwrite to start over")
    state = _new_state(torch, settings)
    state.generator.load_state_dict(payload["generator"])
    state.discriminator.load_state_dict(payload["discriminator"])
    state.ema.load_state_dict(payload["ema"])
    state.generator_optimizer.load_state_dict(payload["generator_optimizer"])
    state.discriminator_optimizer.load_state_dict(payload["discriminator_optimizer"])
    state.batch_generator.set_state(payload["batch_generator"])
    state.step = int(payload["step"])
    return state


def _discriminator_step(torch: Any, state: _State, real: Any, fake: Any, label: Any, fake_label: Any = None) -> float:
    """One hinge-loss update of the discriminator (``fake`` must be detached); returns the loss."""
    real_score, _ = state.discriminator(real, label)
    fake_score, _ = state.discriminator(fake, label if fake_label is None else fake_label)
    loss = torch.relu(1.0 - real_score).mean() + torch.relu(1.0 + fake_score).mean()
    state.discriminator_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.discriminator_optimizer.step()
    return float(loss.detach())


def _mode_seeking(fake: Any, z: Any, half: int) -> Any:
    """Mode-seeking term (MSGAN, Mao et al. 2019): small when two latents of one class give different images.

    ``fake[i]`` and ``fake[i + n - half]`` share a label for ``i < half``. The term is the inverse of the
    image distance per latent distance, so a generator that ignores ``z`` within a class pays for it.
    """
    if half < 1:
        return fake.new_zeros(())
    first, second = fake[:half], fake[len(fake) - half :]
    ratio = (first - second).abs().mean() / (z[:half] - z[len(z) - half :]).abs().mean()
    return 1.0 / (ratio + 1e-5)


def _generator_step(state: _State, loss: Any) -> None:
    state.generator_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.generator_optimizer.step()


@contextlib.contextmanager
def _frozen(module: Any):
    """No parameter gradients for ``module`` inside (the generator's loss goes through it)."""
    parameters = [p for p in module.parameters() if p.requires_grad]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)


def _translate(torch: Any, images: Any, shift: int, generator: Any) -> Any:
    """Shift each image by its own random offset in ``[-shift, shift]`` pixels (edge values fill in).

    Differentiable (an index gather), so it can sit between the generator and the discriminator.
    """
    n, _, height, width = images.shape
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift), mode="replicate")
    rows = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=generator) + torch.arange(height)[None, :, None]
    cols = torch.randint(0, 2 * shift + 1, (n, 1, 1), generator=generator) + torch.arange(width)[None, None, :]
    batch = torch.arange(n)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


@dataclass
class TrainingLoop:
    """What a generator training needs besides the loop itself: its state (made, loaded, saved), one step
    (returning the progress bar's text), the modules in training mode, and the module to export."""

    new_state: Callable[[], Any]
    load_state: Callable[[Path], Any]
    save_state: Callable[[Any, Path], None]
    step: Callable[[Any], str]
    training_modules: Callable[[Any], list]
    exported: Callable[[Any], Any]


def run_training(loop: TrainingLoop, settings: dict, out: Path, *, steps: int, resume: bool, progress: bool, checkpoint_every: int,
                 extra_meta: dict, description: str) -> TrainResult:
    """Train (or continue from ``out/checkpoint.pt``) until ``steps``, checkpointing, then export; used by
    ``gan train``/``distill`` and by data-free synthesis. The state has a ``step`` counter."""
    torch = import_torch()
    checkpoint = out / CHECKPOINT_FILE
    state = loop.load_state(checkpoint) if resume and checkpoint.exists() else loop.new_state()
    resumed_from = state.step
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=min(state.step, steps), desc=description, unit="step")
    try:
        for module in loop.training_modules(state):
            module.train()
        while state.step < steps:
            postfix = loop.step(state)
            state.step += 1
            if bar is not None:
                bar.update(1)
                if state.step % 20 == 0:
                    bar.set_postfix_str(postfix)
            if state.step % checkpoint_every == 0 or state.step == steps:
                loop.save_state(state, checkpoint)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - started
    generator = _export(torch, loop.exported(state), settings, out, {**extra_meta, "steps": state.step, "settings": settings})
    return TrainResult(str(out), generator, state.step, resumed_from, seconds, str(out / SAMPLES_FILE))


def _run(settings: dict, out: Path, step_function: Callable, *, steps: int, resume: bool, progress: bool, checkpoint_every: int,
         extra_meta: dict, description: str) -> TrainResult:
    """The GAN's training: ``step_function`` updates discriminator and generator, then the EMA generator
    follows; the EMA generator is exported."""
    torch = import_torch()

    def step(state: _State) -> str:
        loss_d, loss_g = step_function(state, state.batch_generator)
        _update_ema(torch, state)
        return f"loss D {loss_d:.3f}, G {loss_g:.3f}"

    loop = TrainingLoop(
        new_state=lambda: _new_state(torch, settings),
        load_state=lambda path: _load_checkpoint(torch, settings, path),
        save_state=lambda state, path: _save_checkpoint(torch, state, settings, path),
        step=step,
        training_modules=lambda state: [state.generator, state.discriminator],
        exported=lambda state: state.ema,
    )
    return run_training(loop, settings, out, steps=steps, resume=resume, progress=progress, checkpoint_every=checkpoint_every,
                        extra_meta=extra_meta, description=description)


def _update_ema(torch: Any, state: _State) -> None:
    # Warm-up: early on the average would be dominated by the random initialisation.
    decay = min(_EMA_DECAY, (1.0 + state.step) / (10.0 + state.step))
    with torch.no_grad():
        for averaged, current in zip(state.ema.parameters(), state.generator.parameters()):
            averaged.lerp_(current, 1.0 - decay)
        for averaged, current in zip(state.ema.buffers(), state.generator.buffers()):
            averaged.copy_(current)


def _standing_statistics(torch: Any, generator: Any, settings: dict) -> Any:
    """A copy of ``generator`` whose BatchNorm statistics are re-estimated from its own batches."""
    model = copy.deepcopy(generator)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over all the batches below
    model.train()
    rng = torch.Generator().manual_seed(settings["seed"] + 2)
    classes = settings["num_classes"]
    with torch.no_grad():
        for _ in range(_STANDING_BATCHES):
            z = torch.randn(_STANDING_BATCH_SIZE, settings["latent_size"], generator=rng)
            label = torch.randint(max(classes, 1), (_STANDING_BATCH_SIZE,), generator=rng)
            model(z, label)
    return model.eval()


def _export_module(torch: Any, generator: Any, conditional: bool) -> Any:
    """The generator with the public call signature: ``(z, label)``, or ``(z)`` when unconditional."""

    class Conditional(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z: Any, label: Any) -> Any:
            return self.inner(z, label)

    class Unconditional(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, z: Any) -> Any:
            return self.inner(z, torch.zeros(z.shape[0], dtype=torch.long))

    return (Conditional if conditional else Unconditional)(generator).eval()


def _export(torch: Any, generator_module: Any, settings: dict, out: Path, extra_meta: dict) -> Generator:
    """Write ``generator_module`` (called as ``(z, label)``) as TorchScript, OpenVINO IR, ``generator.json``
    (last) and the sample grid into ``out``; used by ``gan train``/``distill`` and by data-free synthesis."""
    import openvino as ov

    conditional = settings["num_classes"] > 0
    module = _export_module(torch, _standing_statistics(torch, generator_module, settings), conditional)
    example = (torch.zeros(2, settings["latent_size"]),) + ((torch.zeros(2, dtype=torch.long),) if conditional else ())
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".export-"))
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # tracer and conversion warnings are about code we control
            with torch.no_grad():
                traced = torch.jit.trace(module, example)
            traced.save(str(staging / "generator.pt"))
            ov_model = ov.convert_model(traced, example_input=example)  # reuses the trace: converting `module` would trace again
        names = ["z", "label"] if conditional else ["z"]
        shapes = {ov_model.inputs[0]: ov.PartialShape([-1, settings["latent_size"]])}
        if conditional:
            shapes[ov_model.inputs[1]] = ov.PartialShape([-1])
        ov_model.reshape(shapes)
        for port, name in zip(ov_model.inputs, names):
            port.get_tensor().set_names({name})
        ov_model.outputs[0].get_tensor().set_names({"image"})
        ov.save_model(ov_model, staging / "generator.xml", compress_to_fp16=False)
        # .bin before .xml, and generator.json after both: a reader never pairs a new .xml with an old .bin.
        for name in ("generator.pt", "generator.bin", "generator.xml"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    info = GeneratorInfo(settings["latent_size"], settings["num_classes"], tuple(settings["image_shape"]), (-1.0, 1.0),
                         "index" if conditional else "none", "openvino", str(out / "generator.xml"))
    write_json_atomically(meta_for(info, {"openvino": "generator.xml", "torchscript": "generator.pt"}, **extra_meta), out / META_FILE)
    generator = load_generator(out)
    save_sample_grid(generator, out / SAMPLES_FILE)
    return generator


def save_sample_grid(generator: Generator, path: str | os.PathLike, *, columns: int = 10, seed: int = 0) -> None:
    """Save a PNG grid of samples: one row per class (first 20 classes), ``columns`` per row.

    Unconditional generators get 8 rows. Tiles are upscaled (nearest) to at least 56 pixels so small
    images are readable. Written to a temporary name, then renamed.
    """
    from PIL import Image

    info = generator.info
    rows = min(info.num_classes, 20) if info.conditional else 8
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((rows * columns, info.latent_size), dtype=np.float32)
    labels = np.repeat(np.arange(rows), columns) if info.conditional else None
    images = generator.images01(z, labels)
    channels, height, width = info.image_shape
    zoom = max(1, -(-56 // max(height, width)))
    gap = 2
    tile_h, tile_w = height * zoom, width * zoom
    canvas = np.full((rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3), 128, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        pixels = np.round(image * 255).astype(np.uint8)
        pixels = np.repeat(pixels, 3, axis=0) if channels == 1 else pixels[:3]
        pixels = pixels.transpose(1, 2, 0).repeat(zoom, axis=0).repeat(zoom, axis=1)
        top, left = gap + r * (tile_h + gap), gap + c * (tile_w + gap)
        canvas[top : top + tile_h, left : left + tile_w] = pixels
    with staged(path, suffix=".png") as temporary:
        Image.fromarray(canvas).save(temporary)
