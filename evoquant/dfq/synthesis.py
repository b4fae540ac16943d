"""Data-free synthesis from the FP32 model alone: ZeroQ and Genie images, and GDFQ / Qimera / ClusterQ generators.

- **ZeroQ** (Cai et al. 2020): a batch of pixels optimised from noise so that every BatchNorm layer's
  input batch statistics match its running statistics (Adam, lr 0.5, 500 steps per batch). The pixels are
  parametrised as ``sigmoid(v)`` so that they stay inside the model's input range (an IR's inputs are
  bounded images; ZeroQ's own models take standardised, unbounded inputs). Labels: the model's own.
- **GDFQ** (Xu et al. 2020): a class-conditional generator (label embedding × z → Linear → BN → upsample →
  conv-BN-LeakyReLU blocks → conv → tanh) trained with the FP model's cross-entropy on the label plus
  0.1 × the BatchNorm-statistics loss. The tanh output is mapped onto the model's input range (GDFQ ends
  in a BatchNorm without affine because its models take standardised inputs).
- **Qimera** (Choi et al. 2021): GDFQ plus boundary-supporting samples: with probability 0.4 a sample's
  embedding superposes k = 2 class embeddings with softmax(randn) coefficients and its target is the
  matching soft label. ``embedding="random"`` is the released setting; ``"classifier"`` initialises the
  embeddings from the FP model's last layer and adds the disentanglement mapping (a linear layer from the
  embedding to the latent space) as the paper describes.
- **ClusterQ** (Gao et al. 2022): GDFQ plus, in the deeper half of the BatchNorm layers, per-class
  centroids of the feature statistics, EMA-updated (decay 0.2) from the generated samples the FP model
  classifies correctly; after a warm-up each class's batch statistics are pulled toward its centroid
  (weight 0.9, the global BNS loss 0.1) with a diversity term that perturbs the target statistics.

Generators are written as a generator directory in the format of ``evoquant gan train`` (IR + TorchScript
+ ``generator.json`` + ``samples.png``), so ``--data gan:DIR`` works everywhere; ZeroQ and Genie write an .npz.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from evoquant.config import ReconstructConfig, RefineConfig
from evoquant.errors import EvoquantError
from evoquant.gan.models import import_torch

METHODS = ("zeroq", "genie", "gdfq", "qimera", "clusterq")
IMAGE_METHODS = ("zeroq", "genie")  # write an .npz of images
GENERATOR_METHODS = ("gdfq", "qimera", "clusterq")  # write a generator directory

#: Defaults sized for 2 CPU cores (a zoo model's data in minutes); the papers' values where they fit.
DEFAULT_STEPS = {"zeroq": 500, "genie": 200, "gdfq": 1500, "qimera": 1500, "clusterq": 1500}
#: Genie: batches made per optimised batch from mixes of its latents (:func:`mixed_latents`). 3: a quarter of
#: the time, and W4A8 refine on the data 0.81-1.10x the held-out KL of fully optimised data on the five
#: BatchNorm zoo models (docs/datafree.md); 0: every image optimised (what Genie's paper does).
DEFAULT_MIXES = {"genie": 3}
#: The BatchNorm-statistics loss when ``bns`` is not given (:func:`resolve_bns`). Genie: relative -- W4A8 refine
#: on its data level with the absolute loss's on bn_cnn and residual_cnn and the families, 24 % lower held-out
#: KL on dw_separable_cnn (three seeds each, same time; docs/datafree.md). The rest: the papers' absolute loss
#: (not measured with the relative one).
DEFAULT_BNS = {"genie": "relative"}
# image methods: what default refine draws from a finite source -- the images the reconstruction fits on
# (1,024) and the verification images (2,048); fewer and refine fits on fewer (it warns)
DEFAULT_IMAGES = ReconstructConfig.images + RefineConfig.verification_size
BNS_WEIGHT = 0.1
GENERATOR_LEARNING_RATE = 1e-3
GENERATOR_BETAS = (0.5, 0.999)
ZEROQ_LEARNING_RATE = 0.5
# Genie-D (the paper: latent 256, generator 128/64 channels, 4,000 steps per batch of 128 on a GPU): the
# generator halved and 200 steps per batch of 64, each optimised batch followed by DEFAULT_MIXES batches of
# mixed latents: a classic zoo model's 3,072 images in 3-4 minutes on 2 cores (a family model's in 10-11).
GENIE_LATENT_SIZE = 256
GENIE_WIDTH = 32
GENIE_LATENT_LEARNING_RATE = 0.1
GENIE_GENERATOR_LEARNING_RATE = 0.01
# Not in the paper (BatchNorm statistics alone): a class term on evenly dealt classes. Without it the classes
# come out uneven (bn_cnn: 32 of 2,560 images a 9) and W4A8 refine on them ends at held-out KL 0.00058 vs 0.00044.
GENIE_CLASS_WEIGHT = 0.1


@dataclass(frozen=True)
class MethodOptions:
    """Settings of the generator methods (the papers' values by default)."""

    latent_size: int = 64
    width: int = 64  # channels of the generator's last block (the first has twice as many)
    bns_weight: float = BNS_WEIGHT
    superpose_probability: float = 0.4  # Qimera
    superpose_classes: int = 2  # Qimera's k
    embedding: str = "random"  # Qimera: random (released code) | classifier (the paper: the FP model's last layer + mapping)
    centroid_decay: float = 0.2  # ClusterQ
    centroid_weight: float = 0.9
    centroid_warmup: int = 200  # steps before the centroid term is on (centroids fill meanwhile)
    diversity: float = 0.5
    tv_weight: float = 0.0  # DeepInversion's image priors on the generated images (in [0, 1]): total variation (L1, mean over pixels)
    l2_weight: float = 0.0  # ... and the mean squared pixel
    # the BatchNorm-statistics loss: absolute (the papers') or relative (each channel's error in units of its
    # running spread; every method, image methods included); None: the method's default (DEFAULT_BNS)
    bns: str | None = None
    # Genie's swing convolution (every method): the input of each strided convolution of the teacher shifted by
    # a random -swing..swing pixels each step (the paper: 1; 0: off)
    swing: int = 0

    def __post_init__(self):
        if self.bns not in (None, "absolute", "relative"):
            raise EvoquantError(f"bns must be absolute or relative, got {self.bns!r}")
        if self.embedding not in ("random", "classifier"):
            raise EvoquantError(f"the embedding must be random or classifier, got {self.embedding!r}")
        if self.latent_size < 1 or self.width < 1:
            raise EvoquantError("the latent size and the width must be at least 1")
        if not 0 <= self.superpose_probability <= 1 or not 0 <= self.centroid_decay < 1 or not 0 <= self.centroid_weight <= 1:
            raise EvoquantError("probabilities, the centroid decay and the centroid weight must be in [0, 1]")
        if not isinstance(self.swing, int) or isinstance(self.swing, bool) or self.swing < 0:
            raise EvoquantError(f"swing must be a whole number of pixels, 0 or more, got {self.swing!r}")
        if self.tv_weight < 0 or self.l2_weight < 0:
            raise EvoquantError("the image prior weights (tv_weight, l2_weight) must be 0 or more")

    def resolved(self, method: str) -> "MethodOptions":
        """These settings with ``bns`` spelled out for ``method`` (:func:`resolve_bns`)."""
        return replace(self, bns=resolve_bns(method, self.bns))

    def values(self) -> dict:
        """Every setting by name: what a generator checkpoint records to refuse a resume with other settings."""
        return {key: getattr(self, key) for key in self.__dataclass_fields__}


def parse_settings(pairs, what: str = "data-free settings") -> dict:
    """``["width=32", "tv_weight=0.1"]`` → ``{"width": 32, "tv_weight": 0.1}``: each value read as YAML (32 is a
    number, classifier a string), as the benchmarks' K=V overrides are. A malformed pair is a one-line error."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sign, value = pair.partition("=")
        if not sign or not key.strip():
            raise EvoquantError(f"{what}: {pair!r} is not KEY=VALUE")
        try:
            settings[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise EvoquantError(f"{what}: {pair!r}: {' '.join(str(error).split())}") from None
    return settings


def method_options(settings: dict, what: str = "data-free settings") -> MethodOptions:
    """:class:`MethodOptions` from a dict, an unknown name or a wrong type as a one-line error."""
    try:
        return MethodOptions(**settings)
    except TypeError as error:
        known = ", ".join(MethodOptions.__dataclass_fields__)
        raise EvoquantError(f"{what}: {' '.join(str(error).split())} (known: {known})") from None


def generator_class():
    """The GDFQ conditional generator as a torch module class (built lazily: torch is optional)."""
    torch = import_torch()
    nn = torch.nn

    class ConditionalGenerator(nn.Module):
        def __init__(self, latent_size: int, num_classes: int, image_shape: tuple[int, int, int], width: int, embedding_size: int | None = None, mapping: bool = False):
            super().__init__()
            channels, height, width_px = image_shape
            embedding_size = embedding_size or latent_size
            self.image_shape = tuple(image_shape)
            self.embedding = nn.Embedding(num_classes, embedding_size)
            self.mapping = nn.Linear(embedding_size, latent_size) if (mapping or embedding_size != latent_size) else nn.Identity()
            self.start = (max(1, height // 4), max(1, width_px // 4))
            self.project = nn.Linear(latent_size, 2 * width * self.start[0] * self.start[1])
            self.blocks = nn.Sequential(
                nn.BatchNorm2d(2 * width),
                nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * width, 2 * width, 3, padding=1),
                nn.BatchNorm2d(2 * width),
                nn.LeakyReLU(0.2),
                nn.Upsample(scale_factor=2),
                nn.Conv2d(2 * width, width, 3, padding=1),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.2),
                nn.Conv2d(width, channels, 3, padding=1),
                nn.Tanh(),
            )
            self.width = width

        def from_embedding(self, z, embedding):
            h = self.project(self.mapping(embedding) * z).view(z.shape[0], 2 * self.width, *self.start)
            image = self.blocks(h)
            if tuple(image.shape[2:]) != self.image_shape[1:]:
                image = nn.functional.interpolate(image, size=self.image_shape[1:], mode="bilinear", align_corners=False)
            return image

        def forward(self, z, label):
            return self.from_embedding(z, self.embedding(label))

    return ConditionalGenerator


# --------------------------------------------------------------------------------------------------
# generators
# --------------------------------------------------------------------------------------------------


@dataclass
class _GeneratorState:
    generator: Any
    optimizer: Any
    rng: Any  # torch.Generator
    step: int
    centroids: Any = None


def train_generator(teacher, method: str, *, out_dir: str | os.PathLike, steps: int | None = None, batch_size: int = 64, seed: int = 0,
                    resume: bool = False, overwrite: bool = False, progress: bool = True, checkpoint_every: int = 250,
                    options: MethodOptions = MethodOptions(), teacher_id: str = "module"):
    """Train a GDFQ, Qimera or ClusterQ generator for ``teacher`` and write it as a generator directory.
    Returns a :class:`evoquant.gan.train.TrainResult`."""
    from evoquant.dfq.losses import bns_loss, soft_cross_entropy, superpose
    from evoquant.gan.train import TrainingLoop, _prepare_out_dir, run_training

    if method not in GENERATOR_METHODS:
        raise EvoquantError(f"unknown generator method {method!r}; choose {', '.join(GENERATOR_METHODS)}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    _check_positive(steps=steps, batch_size=batch_size, checkpoint_every=checkpoint_every)
    if seed < 0:
        raise EvoquantError(f"the seed must be 0 or more, got {seed}")
    torch = import_torch()
    options = options.resolved(method)
    settings = {
        "kind": f"datafree-{method}", "method": method, "latent_size": options.latent_size, "num_classes": teacher.num_classes,
        "image_shape": list(teacher.image_shape), "value_range": list(teacher.value_range), "batch_size": batch_size, "seed": seed,
        "teacher": teacher_id, "options": options.values(),
    }
    out = _prepare_out_dir(out_dir, resume=resume, overwrite=overwrite)
    classes = teacher.num_classes
    cross_entropy = torch.nn.CrossEntropyLoss()

    def step(state: _GeneratorState) -> str:
        z = torch.randn(batch_size, options.latent_size, generator=state.rng)
        if method == "qimera":
            drawn = superpose(batch_size, classes, probability=options.superpose_probability, k=options.superpose_classes, generator=state.rng)
            embedding = (state.generator.embedding(drawn.classes) * drawn.coefficients[..., None]).sum(dim=1)
            fake = state.generator.from_embedding(z, embedding)
            labels, targets = drawn.classes[:, 0], drawn.targets
        else:
            labels = torch.randint(classes, (batch_size,), generator=state.rng)
            fake, targets = state.generator(z, labels), None
        logits, stats = teacher((fake + 1) / 2, swing=options.swing, draw=state.rng)
        task = soft_cross_entropy(logits, targets) if targets is not None else cross_entropy(logits, labels)
        statistics = bns_loss(stats, relative=options.bns == "relative")
        if method == "clusterq":
            correct = logits.argmax(dim=1) == labels
            state.centroids.update(stats, labels, correct)
            if state.step >= options.centroid_warmup:
                clustered = state.centroids.loss(stats, labels, diversity=options.diversity, generator=state.rng)
                statistics = (1 - options.centroid_weight) * statistics + options.centroid_weight * clustered
        loss = task + options.bns_weight * statistics
        if options.tv_weight or options.l2_weight:
            loss = loss + image_prior((fake + 1) / 2, tv_weight=options.tv_weight, l2_weight=options.l2_weight)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        return f"CE {task.item():.3f}, BNS {statistics.item():.4f}"

    loop = TrainingLoop(
        new_state=lambda: _new_generator_state(torch, settings, teacher, options),
        load_state=lambda path: _load_generator_checkpoint(torch, path, settings, teacher, options),
        save_state=lambda state, path: _save_generator_checkpoint(torch, state, settings, path),
        step=step,
        training_modules=lambda state: [state.generator],
        exported=lambda state: state.generator,
    )
    return run_training(loop, settings, out, steps=steps, resume=resume, progress=progress, checkpoint_every=checkpoint_every,
                        extra_meta={"data_free": method}, description=f"datafree {method}")


def image_prior(images, *, tv_weight: float, l2_weight: float):
    """DeepInversion's image prior on a batch in [0, 1]: ``tv_weight`` × the mean absolute difference of
    neighbouring pixels (both directions) + ``l2_weight`` × the mean squared pixel. Generic smoothness and
    energy terms: BatchNorm statistics alone let a generator fill the frame with fragments (measured on
    bn_cnn: twice the real digits' mean pixel and total variation)."""
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    return tv_weight * (vertical + horizontal) + l2_weight * (images**2).mean()


def _new_generator_state(torch: Any, settings: dict, teacher, options: MethodOptions) -> _GeneratorState:
    from evoquant.dfq.losses import ClassCentroids

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings["seed"])
        embedding_size, mapping = None, False
        weight = teacher.classifier_weight() if settings["method"] == "qimera" and options.embedding == "classifier" else None
        if settings["method"] == "qimera" and options.embedding == "classifier":
            if weight is None:
                raise EvoquantError(f"{teacher.source} does not end in a linear layer: Qimera's classifier embedding needs one (use --embedding random)")
            embedding_size, mapping = int(weight.shape[1]), True
        generator = generator_class()(settings["latent_size"], settings["num_classes"], tuple(settings["image_shape"]), options.width, embedding_size, mapping)
        if weight is not None:
            with torch.no_grad():
                generator.embedding.weight.copy_(weight)
    optimizer = torch.optim.Adam(generator.parameters(), lr=GENERATOR_LEARNING_RATE, betas=GENERATOR_BETAS)
    centroids = ClassCentroids.deeper_half(settings["num_classes"], teacher.layers, options.centroid_decay) if settings["method"] == "clusterq" else None
    return _GeneratorState(generator, optimizer, torch.Generator().manual_seed(settings["seed"] + 1), 0, centroids)


def _save_generator_checkpoint(torch: Any, state: _GeneratorState, settings: dict, path: Path) -> None:
    from evoquant.paths import staged

    payload = {"version": 1, "settings": settings, "step": state.step, "generator": state.generator.state_dict(), "optimizer": state.optimizer.state_dict(),
               "rng": state.rng.get_state(), "centroids": None if state.centroids is None else state.centroids.state_dict()}
    with staged(path) as temporary:
        torch.save(payload, temporary)


def _load_generator_checkpoint(torch: Any, path: Path, settings: dict, teacher, options: MethodOptions) -> _GeneratorState:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a truncated or foreign file: torch raises several kinds
        raise EvoquantError(f"cannot read the checkpoint {path}: {' '.join(str(error).split())[:200]}") from None
    if not isinstance(payload, dict) or payload.get("version") != 1 or "optimizer" not in payload:
        raise EvoquantError(f"{path} is not an evoquant data-free checkpoint")
    saved = dict(payload["settings"])
    if isinstance(saved.get("options"), dict):  # a checkpoint from before a setting existed ran with its default
        saved["options"] = {**MethodOptions().resolved(str(saved.get("method"))).values(), **saved["options"]}
    changed = [key for key in sorted(set(saved) | set(settings)) if saved.get(key) != settings.get(key)]
    if changed:
        raise EvoquantError(f"the checkpoint in {path.parent} was made with other settings or another teacher ({', '.join(changed)}); "
                            "use the same ones, or --overwrite to start over")
    state = _new_generator_state(torch, settings, teacher, options)
    state.generator.load_state_dict(payload["generator"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.rng.set_state(payload["rng"])
    state.step = int(payload["step"])
    if state.centroids is not None:
        state.centroids.load_state_dict(payload["centroids"])
    return state


# --------------------------------------------------------------------------------------------------
# distilled images: ZeroQ (pixels) and Genie (a per-batch generator and its latents)
# --------------------------------------------------------------------------------------------------


def resolve_bns(method: str, bns: str | None) -> str:
    """The BatchNorm-statistics loss ``method`` uses: ``bns``, or the method's default (:data:`DEFAULT_BNS`;
    absolute for a method not in it)."""
    return DEFAULT_BNS.get(method, "absolute") if bns is None else bns


def resolve_mixes(method: str, mixes: int | None) -> int:
    """How many mixed batches ``method`` makes per optimised one: ``mixes``, or the method's default
    (:data:`DEFAULT_MIXES`; 0 for a method without latents to mix). A negative count, or mixes for a
    method that has no latents, is a one-line error."""
    if mixes is None:
        return DEFAULT_MIXES.get(method, 0)
    if mixes < 0:
        raise EvoquantError(f"mixes must be 0 or more, got {mixes}")
    if mixes and method not in DEFAULT_MIXES:
        raise EvoquantError(f"mixes applies to the optimised latents of {', '.join(DEFAULT_MIXES)}; {method} has none to mix (got mixes {mixes})")
    return mixes


def distilled_images(teacher, n: int, *, method: str = "zeroq", steps: int | None = None, batch_size: int = 64, seed: int = 0, progress: bool = True,
                     partial: Path | None = None, mixes: int | None = None, bns: str | None = None, swing: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images in [0, 1] optimised batch by batch for ``teacher``'s BatchNorm statistics, and the
    teacher's labels: ZeroQ's pixels or Genie's per-batch generator (:data:`IMAGE_METHODS`).

    Genie with ``mixes`` > 0 (default :data:`DEFAULT_MIXES`): each optimised batch also yields that many
    batches more from its generator, fed convex mixes of pairs of its optimised latents
    (:func:`mixed_latents`): ``1 + mixes`` times the images for one optimisation. ``bns``: the statistics
    loss, absolute or relative (:func:`evoquant.dfq.losses.bns_loss`; default :data:`DEFAULT_BNS`); ``swing``: Genie's swing convolution
    (:func:`evoquant.dfq.teacher.swung`) while optimising.

    Batch b is seeded by (seed, b), so a run continued from ``partial`` (the finished batches, saved after
    each one) makes the same images as an uninterrupted one."""
    from evoquant.dfq.losses import bns_loss
    from evoquant.paths import staged

    if method not in IMAGE_METHODS:
        raise EvoquantError(f"unknown image method {method!r}; choose {', '.join(IMAGE_METHODS)}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    _check_positive(n=n, steps=steps, batch_size=batch_size)
    mixes = resolve_mixes(method, mixes)
    bns = MethodOptions(bns=bns, swing=swing).resolved(method).bns
    relative = bns == "relative"
    torch = import_torch()
    per_batch = batch_size * (1 + mixes)  # images one optimisation yields
    done_images, done_labels = [], []
    if partial is not None and partial.is_file():
        with np.load(partial, allow_pickle=False) as archive:
            same = (str(archive["method"]) if "method" in archive else "zeroq") == method and int(archive["steps"]) == steps
            same = same and (int(archive["mixes"]) if "mixes" in archive else 0) == mixes
            same = same and (str(archive["bns"]) if "bns" in archive else "absolute") == bns
            same = same and (int(archive["swing"]) if "swing" in archive else 0) == swing
            if same and int(archive["batch_size"]) == batch_size and int(archive["seed"]) == seed and list(archive["shape"]) == list(teacher.image_shape):
                done_images, done_labels = [archive["x"]], [archive["y"]]
    have = sum(len(x) for x in done_images)
    batches = -(-n // per_batch)
    bar = _bar(progress, batches * steps, (have // per_batch) * steps, f"datafree {method}")
    tick = bar.update if bar is not None else lambda _: None
    try:
        for batch in range(have // per_batch, batches):
            size = min(batch_size, -(-(n - batch * per_batch) // (1 + mixes)))
            batch_seed = int(np.random.SeedSequence([seed, batch]).generate_state(1)[0] % 2**31)
            if method == "zeroq":
                outputs = [_zeroq_batch(torch, teacher, size, steps, batch_seed, tick, relative=relative, swing=swing)]
            else:
                outputs = _genie_batch(torch, teacher, size, steps, batch_seed, tick, mixes=mixes, relative=relative, swing=swing)
            losses = []
            for images in outputs:
                with torch.no_grad():
                    logits, stats = teacher(images)
                done_images.append(images.numpy().astype(np.float32))
                done_labels.append(logits.argmax(dim=1).numpy().astype(np.int64))
                losses.append(float(bns_loss(stats, std=True, relative=relative)))
            if bar is not None:
                bar.set_postfix_str(f"BNS {losses[0]:.4f}" + (f", mixes {np.mean(losses[1:]):.4f}" if mixes else ""))
            if partial is not None:
                with staged(partial) as temporary:
                    np.savez(temporary, x=np.concatenate(done_images), y=np.concatenate(done_labels), steps=steps, batch_size=batch_size, seed=seed,
                             shape=np.array(teacher.image_shape), method=method, mixes=mixes, bns=bns, swing=swing)
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(done_images)[:n], np.concatenate(done_labels)[:n]


def _zeroq_batch(torch: Any, teacher, size: int, steps: int, seed: int, tick, *, relative: bool = False, swing: int = 0) -> Any:
    """ZeroQ: pixels ``sigmoid(v)`` from Gaussian noise, Adam (lr 0.5) on the BatchNorm statistics."""
    from evoquant.dfq.losses import bns_loss

    pixels = torch.randn(size, *teacher.image_shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)
    optimizer = torch.optim.Adam([pixels], lr=ZEROQ_LEARNING_RATE)
    shifts = torch.Generator().manual_seed(seed + 2)
    for _ in range(steps):
        _, stats = teacher(torch.sigmoid(pixels), swing=swing, draw=shifts)
        loss = bns_loss(stats, std=True, relative=relative)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tick(1)
    return torch.sigmoid(pixels).detach()


def _genie_batch(torch: Any, teacher, size: int, steps: int, seed: int, tick, *, mixes: int = 0, relative: bool = False, swing: int = 0) -> list:
    """Genie-D: a fresh small generator and one latent vector per image, both optimised on the BatchNorm
    statistics (latents Adam lr 0.1 with a plateau schedule, generator Adam lr 0.01 decayed ×0.95 every
    100 steps), plus ``GENIE_CLASS_WEIGHT`` × the cross-entropy on classes dealt evenly over the batch. The
    generator's convolutions make neighbouring pixels share parameters: smooth strokes where ZeroQ's free
    pixels make speckle. Returns the optimised batch, then ``mixes`` batches of the same generator on
    :func:`mixed_latents` (seeded from ``seed``)."""
    from evoquant.dfq.losses import bns_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        generator = genie_generator_class()(teacher.image_shape, GENIE_LATENT_SIZE, GENIE_WIDTH)
        latents = torch.randn(size, GENIE_LATENT_SIZE).requires_grad_(True)
        classes = torch.randperm(size) % teacher.num_classes
    latent_optimizer = torch.optim.Adam([latents], lr=GENIE_LATENT_LEARNING_RATE)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(latent_optimizer, min_lr=1e-4, patience=100)
    generator_optimizer = torch.optim.Adam(generator.parameters(), lr=GENIE_GENERATOR_LEARNING_RATE)
    decay = torch.optim.lr_scheduler.ExponentialLR(generator_optimizer, gamma=0.95)
    shifts = torch.Generator().manual_seed(seed + 2)
    for step in range(steps):
        logits, stats = teacher(generator(latents), swing=swing, draw=shifts)
        loss = bns_loss(stats, std=True, relative=relative) + GENIE_CLASS_WEIGHT * torch.nn.functional.cross_entropy(logits, classes)
        latent_optimizer.zero_grad(set_to_none=True)
        generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        latent_optimizer.step()
        generator_optimizer.step()
        plateau.step(loss.item())
        if (step + 1) % 100 == 0:
            decay.step()
        tick(1)
    draw = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # training-mode BatchNorm: each batch normalised by its own statistics, as the loss saw them
        return [generator(latents)] + [generator(mixed_latents(torch, latents.detach(), draw)) for _ in range(mixes)]


def mixed_latents(torch: Any, latents: Any, draw: Any) -> Any:
    """New latents from a batch of optimised ones: each the mix ``a·z_i + (1 − a)·z_j`` of its own row and a
    random other (a permutation; now and then the row itself, rescaled), ``a`` uniform in [0, 1], divided by ``sqrt(a² + (1 − a)²)`` so that mixing
    two independent latents keeps their scale. Measured: a Genie generator's batch on such latents matches
    the BatchNorm statistics 3-5x less closely than the optimised batch, but about 6x more closely than on
    latents drawn afresh from a Gaussian with the batch's mean and spread, or on per-dimension shuffles
    (docs/datafree.md)."""
    weight = torch.rand(len(latents), 1, generator=draw)
    partner = latents[torch.randperm(len(latents), generator=draw)]
    return (weight * latents + (1 - weight) * partner) / torch.sqrt(weight**2 + (1 - weight) ** 2)


def genie_generator_class():
    """Genie-D's generator as a torch module class: latent → Linear → BN → ×2 → conv(2w→w)-BN-LeakyReLU →
    ×2 → conv(w→C) → sigmoid (images in [0, 1]; the paper ends in tanh and a BatchNorm for standardised
    inputs)."""
    torch = import_torch()
    nn = torch.nn

    class GenieGenerator(nn.Module):
        def __init__(self, image_shape: tuple[int, int, int], latent_size: int, width: int):
            super().__init__()
            channels, height, width_px = image_shape
            self.image_shape = tuple(image_shape)
            self.start = (max(1, height // 4), max(1, width_px // 4))
            self.width = width
            self.project = nn.Linear(latent_size, 2 * width * self.start[0] * self.start[1])
            self.blocks = nn.Sequential(
                nn.BatchNorm2d(2 * width), nn.Upsample(scale_factor=2), nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.LeakyReLU(0.2),
                nn.Upsample(scale_factor=2), nn.Conv2d(width, channels, 3, padding=1),
            )

        def forward(self, latents):
            image = self.blocks(self.project(latents).view(latents.shape[0], 2 * self.width, *self.start))
            if tuple(image.shape[2:]) != self.image_shape[1:]:
                image = nn.functional.interpolate(image, size=self.image_shape[1:], mode="bilinear", align_corners=False)
            return torch.sigmoid(image)

    return GenieGenerator


def _bar(progress: bool, total: int, initial: int, description: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="step")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EvoquantError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")


def teacher_digest(path: str | os.PathLike) -> str:
    digest = hashlib.sha256(Path(path).read_bytes())
    return digest.hexdigest()[:16]
