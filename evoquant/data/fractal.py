"""The ``fractal`` source: procedural FractalDB-style images rendered from iterated function systems.

Following FractalDB (Kataoka et al., "Pre-training without Natural Images", ACCV 2020), a *system*
is a set of 2-7 random affine maps ``w_i(p) = A_i p + b_i`` (entries of ``A_i`` and ``b_i`` uniform
in ``[-1, 1]``), chosen with probability proportional to ``|det A_i|``.  Its attractor is drawn
with the chaos game: start on the attractor, repeatedly apply a randomly chosen map, and plot the
visited points.  The result is a bright, stroke-like structure on a dark background -- a
label-bearing, data-free stand-in for natural images (or MNIST-style digits) when calibrating a
quantised model.

Specs:
    ``fractal``    -- 64 systems (classes);
    ``fractal:K``  -- K systems, ``1 <= K <= 10000``.  The label of an image is its system index.

Systems are kept only if their attractor is contractive (every ``||A_i|| < 1``), fills enough of
the frame (FractalDB's filling rate) and has zero area (``sum |det A_i| <= 1``: strokes, not blobs).
The K systems are drawn from a generator with a fixed seed, so ``fractal:64`` names the same 64
systems in every run (with the same numpy), and ``fractal:K`` is always a prefix of
``fractal:K'`` for ``K < K'``.  The ``seed`` given to :meth:`~evoquant.data.DataSource.sample`
only decides which system each image shows and its augmentation (flip, rotation, scale,
position, intensity gain, background, colours).

Speed: the chaos game runs many short chains per image, so each of the few dozen iterations is one
vectorised numpy step over every chain of every image in the batch; points are splatted into the
pixel grid with ``np.bincount``.  512 images of 1x28x28 render in well under a second.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from evoquant.data.registry import DataSource, register_source
from evoquant.errors import EvoquantError

__all__ = ["FractalSource"]

DEFAULT_SYSTEMS = 64
MAX_SYSTEMS = 10_000
MAX_MAPS = 7          # maps per system are drawn from MIN_MAPS..MAX_MAPS
MIN_MAPS = 2

# Fixed seed of the system set: changing it changes what "fractal:64" means, i.e. every label.
_SYSTEMS_SEED = 0x46_52_41_43  # "FRAC"

# Candidate systems are kept only if
#  * their plain rendering at _FILL_RES x _FILL_RES covers at least _MIN_FILL of the image
#    (FractalDB's "filling rate" test, threshold tuned for this renderer), which rejects attractors
#    that collapse to a line, a few dots or a tiny cluster; and
#  * the maps' total area ratio sum|det A_i| is at most _MAX_AREA_RATIO.  The attractor K satisfies
#    K = U w_i(K), so area(K) <= sum|det A_i| * area(K): below 1 the attractor has zero area, i.e.
#    it is made of strokes and dust rather than a filled blob.  Looking at renders, this is what
#    separates crisp, digit-like structures from fuzzy clouds.
_FILL_RES = 32
_FILL_POINTS = 1536
_MIN_FILL = 0.12
_MAX_AREA_RATIO = 1.0

# Chaos game shape: every image runs ceil(points / _STEPS) independent chains of _STEPS steps.  Few
# steps with many chains keeps the Python loop short while the vectorised arrays stay large.
# Chains start on the attractor (at a fixed point of one of the maps), so no burn-in is needed;
# _BURN_IN steps are still skipped so chains started at the same fixed point spread out first.
_STEPS = 24
_BURN_IN = 4
# Points per image: proportional to the pixel count, bounded so tiny images still show a
# continuous structure and large ones stay affordable.
_POINTS_PER_PIXEL = 3.0
_MIN_POINTS = 1024
_MAX_POINTS = 32_768
# Upper bound on the points processed at once (limits temporary memory for large batches).
_CHUNK_POINTS = 1 << 21

# Augmentation ranges.
_MAX_ROTATION = math.radians(30.0)
_SCALE_RANGE = (0.8, 1.0)           # fraction of the largest size that fits inside the margins
_MARGIN_FRACTION = 0.1              # empty border on each side, like the padding of MNIST digits
_GAIN_RANGE = (0.75, 1.0)           # brightness of the densest part of the structure
_BACKGROUND_RANGE = (0.0, 0.1)      # dark background level
# Pixel intensity = 1 - exp(-hits / (_DENSITY_SOFTNESS * mean hits of a lit pixel)): pixels with a
# typical point density saturate, sparse outskirts fade out smoothly instead of vanishing.
_DENSITY_SOFTNESS = 0.35


@dataclass(frozen=True)
class _Systems:
    """A set of M IFS systems padded to MAX_MAPS maps, in the flat layout the renderer gathers from.

    Attributes:
        params: ``(M * MAX_MAPS, 6)`` rows ``a11, a12, a21, a22, b1, b2`` of map ``m`` of system ``s``
            at row ``s * MAX_MAPS + m`` (padding maps are zeros and never selected).
        fixed: ``(M * MAX_MAPS, 2)`` fixed point of every map, a point on the attractor.
        cum: ``(M, MAX_MAPS)`` cumulative map probabilities; the last real map and the padding
            hold exactly 1.0, so a uniform ``u < 1`` never selects a padding map.
        n_maps: ``(M,)`` number of real maps.
    """

    params: np.ndarray
    fixed: np.ndarray
    cum: np.ndarray
    n_maps: np.ndarray

    def __len__(self) -> int:
        return int(self.n_maps.shape[0])

    def area_ratio(self) -> np.ndarray:
        """``(M,)`` total area scaling ``sum_i |det A_i|`` of each system (padding maps add 0)."""
        p = self.params.reshape(len(self), MAX_MAPS, 6)
        return np.abs(p[..., 0] * p[..., 3] - p[..., 1] * p[..., 2]).sum(axis=1)

    def take(self, idx: np.ndarray | slice) -> "_Systems":
        rows = np.arange(len(self))[idx]
        flat = (rows[:, None] * MAX_MAPS + np.arange(MAX_MAPS)).ravel()
        return _Systems(self.params[flat], self.fixed[flat], self.cum[rows], self.n_maps[rows])

    @staticmethod
    def concat(parts: list["_Systems"]) -> "_Systems":
        return _Systems(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("params", "fixed", "cum", "n_maps")))


def _spectral_norm_2x2(a: np.ndarray) -> np.ndarray:
    """Largest singular value of each 2x2 matrix in ``a`` (shape ``(..., 2, 2)``), in closed form."""
    fro2 = np.sum(a * a, axis=(-2, -1))
    det = a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    disc = np.sqrt(np.maximum(fro2 * fro2 - 4.0 * det * det, 0.0))
    return np.sqrt((fro2 + disc) / 2.0)


def _draw_candidates(rng: np.random.Generator, count: int) -> _Systems:
    """Draw ``count`` random contractive systems (not yet filtered by filling rate)."""
    n_maps = rng.integers(MIN_MAPS, MAX_MAPS + 1, size=count)
    total = int(n_maps.sum())
    # Each map's linear part is re-drawn until it is a contraction (spectral norm < 1): the chaos
    # game then converges and the attractor is bounded.  Drawing a pool and keeping the
    # contractions in order is the vectorised form of that per-map rejection.
    mats: list[np.ndarray] = []
    have = 0
    while have < total:
        pool = rng.uniform(-1.0, 1.0, size=(max(4 * (total - have), 64), 2, 2))
        pool = pool[_spectral_norm_2x2(pool) < 1.0]
        mats.append(pool)
        have += len(pool)
    a = np.concatenate(mats)[:total]
    b = rng.uniform(-1.0, 1.0, size=(total, 2))

    params = np.zeros((count * MAX_MAPS, 6))
    fixed = np.zeros((count * MAX_MAPS, 2))
    cum = np.ones((count, MAX_MAPS))
    # Row of map m of candidate s in the padded layout.
    starts = np.concatenate([[0], np.cumsum(n_maps)[:-1]])
    owner = np.repeat(np.arange(count), n_maps)
    slot = np.arange(total) - starts[owner]
    rows = owner * MAX_MAPS + slot

    params[rows, 0:4] = a.reshape(total, 4)
    params[rows, 4:6] = b
    # Fixed point p = A p + b  <=>  (I - A) p = b; I - A is invertible because ||A|| < 1.
    fixed[rows] = np.linalg.solve(np.eye(2) - a, b[:, :, None])[:, :, 0]

    # FractalDB map probabilities: proportional to |det A_i| (area scaling), with a floor so a
    # nearly singular map is still visited now and then.
    det = np.abs(a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]) + 1e-3
    prob = np.zeros((count, MAX_MAPS))
    prob[owner, slot] = det
    prob /= prob.sum(axis=1, keepdims=True)
    cum[:] = np.cumsum(prob, axis=1)
    # Force exact 1.0 from the last real map on (guards against cumsum rounding to 0.99999...).
    cum[np.arange(MAX_MAPS)[None, :] >= (n_maps[:, None] - 1)] = 1.0
    return _Systems(params, fixed, cum, n_maps)


class _SystemBank:
    """The process-wide, lazily grown list of accepted systems drawn from the fixed seed.

    Candidates are drawn and filtered in a fixed order from one generator, so the first K accepted
    systems never depend on how many were asked for (``fractal:K`` is a prefix of ``fractal:K'``).
    """

    _BATCH = 128

    def __init__(self) -> None:
        self._rng = np.random.default_rng(_SYSTEMS_SEED)
        self._parts: list[_Systems] = []
        self._count = 0
        self._lock = threading.Lock()

    def first(self, k: int) -> _Systems:
        with self._lock:
            while self._count < k:
                cand = _draw_candidates(self._rng, self._BATCH)
                fill = _filling_rate(cand, np.random.default_rng([_SYSTEMS_SEED, len(self._parts)]))
                keep = cand.take(np.flatnonzero((fill >= _MIN_FILL) & (cand.area_ratio() <= _MAX_AREA_RATIO)))
                self._parts.append(keep)
                self._count += len(keep)
            return _Systems.concat(self._parts).take(slice(0, k))


_BANK = _SystemBank()


def _filling_rate(systems: _Systems, rng: np.random.Generator) -> np.ndarray:
    """Fraction of the pixels of a plain (un-augmented) ``_FILL_RES`` render each system covers."""
    m = len(systems)
    hits, _ = _render(
        systems,
        np.arange(m),
        _Augment.identity(m),
        _FILL_RES,
        _FILL_RES,
        _FILL_POINTS,
        rng,
        per_map=False,
    )
    return (hits > 0.25).mean(axis=(1, 2))


@dataclass(frozen=True)
class _Augment:
    """Per-image geometric augmentation of the point cloud (all arrays shaped ``(N,)``)."""

    cos: np.ndarray
    sin: np.ndarray
    flip: np.ndarray       # bool: mirror horizontally
    scale: np.ndarray      # fraction of the largest fitting size
    pos_x: np.ndarray      # where in the free horizontal space the structure sits, in [0, 1]
    pos_y: np.ndarray

    @staticmethod
    def identity(n: int) -> "_Augment":
        one, half = np.ones(n), np.full(n, 0.5)
        return _Augment(one, np.zeros(n), np.zeros(n, bool), one, half, half)

    @staticmethod
    def random(n: int, rng: np.random.Generator) -> "_Augment":
        theta = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
        return _Augment(
            np.cos(theta),
            np.sin(theta),
            rng.random(n) < 0.5,
            rng.uniform(*_SCALE_RANGE, n),
            rng.random(n),
            rng.random(n),
        )

    def take(self, sl: slice) -> "_Augment":
        return _Augment(*(getattr(self, f)[sl] for f in ("cos", "sin", "flip", "scale", "pos_x", "pos_y")))


def _chaos_game(systems: _Systems, sys_idx: np.ndarray, n_points: int, rng: np.random.Generator):
    """Run the chaos game for each image (system ``sys_idx[i]``).

    Returns ``(xs, ys, maps)``, each shaped ``(steps, N, chains)`` with ``steps * chains >=
    n_points``: the visited points and the index of the map that produced each point.
    """
    n = len(sys_idx)
    chains = max(1, -(-n_points // _STEPS))
    sys_c = np.repeat(sys_idx, chains)                      # system of every chain, image-major
    cum_c = systems.cum[sys_c].astype(np.float32)           # (N*chains, MAX_MAPS)
    base = sys_c * MAX_MAPS

    def pick_maps() -> np.ndarray:
        # Inverse-CDF sampling: the number of cumulative probabilities <= u is the map index.
        u = rng.random(len(sys_c), dtype=np.float32)
        return (u[:, None] >= cum_c).sum(axis=1)

    # Start every chain on the attractor, at the fixed point of a randomly chosen map.
    start = systems.fixed[base + pick_maps()]
    x = start[:, 0].astype(np.float32)
    y = start[:, 1].astype(np.float32)
    params = systems.params.astype(np.float32)

    xs = np.empty((_STEPS, n * chains), np.float32)
    ys = np.empty_like(xs)
    maps = np.empty((_STEPS, n * chains), np.int8)
    for step in range(-_BURN_IN, _STEPS):
        j = pick_maps()
        p = params[base + j]                                 # one gather of all 6 parameters
        x, y = p[:, 0] * x + p[:, 1] * y + p[:, 4], p[:, 2] * x + p[:, 3] * y + p[:, 5]
        if step >= 0:
            xs[step], ys[step], maps[step] = x, y, j
    shape = (_STEPS, n, chains)
    return xs.reshape(shape), ys.reshape(shape), maps.reshape(shape)


def _render(
    systems: _Systems,
    sys_idx: np.ndarray,
    aug: _Augment,
    height: int,
    width: int,
    n_points: int,
    rng: np.random.Generator,
    *,
    per_map: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Render the attractors of ``systems[sys_idx]`` as hit-count images.

    Returns ``(hits, hits_per_map)``: ``hits`` is ``(N, H, W)`` float32 bilinear-splatted point
    counts; ``hits_per_map`` is ``(N, H, W, MAX_MAPS)`` (the same split by the map that produced
    each point, for per-map colouring) when ``per_map`` is set, else ``None``.
    """
    n = len(sys_idx)
    xs, ys, maps = _chaos_game(systems, sys_idx, n_points, rng)

    # Geometric augmentation of each image's point cloud: rotate, then mirror.
    c = aug.cos.astype(np.float32)[None, :, None]
    s = aug.sin.astype(np.float32)[None, :, None]
    xr = c * xs - s * ys
    yr = s * xs + c * ys
    xr = np.where(aug.flip[None, :, None], -xr, xr)

    # Fit the bounding box into the frame minus a margin, preserving the aspect ratio (so a
    # structure is never stretched), then shrink by the random scale and place it at a random
    # position in the space left over.
    x_min, x_max = xr.min(axis=(0, 2)), xr.max(axis=(0, 2))
    y_min, y_max = yr.min(axis=(0, 2)), yr.max(axis=(0, 2))
    # At least one pixel of margin (so bilinear splats stay inside), but never more than leaves a
    # one-pixel-wide drawing area in degenerate tiny frames.
    margin_x = min(max(1.0, _MARGIN_FRACTION * width), (width - 1) / 2)
    margin_y = min(max(1.0, _MARGIN_FRACTION * height), (height - 1) / 2)
    inner_w, inner_h = width - 2 * margin_x, height - 2 * margin_y
    ext_x = np.maximum(x_max - x_min, 1e-6)
    ext_y = np.maximum(y_max - y_min, 1e-6)
    zoom = np.minimum(inner_w / ext_x, inner_h / ext_y) * aug.scale
    off_x = margin_x + (inner_w - ext_x * zoom) * aug.pos_x
    off_y = margin_y + (inner_h - ext_y * zoom) * aug.pos_y
    # Continuous pixel coordinates, pixel k spanning [k, k+1); shifted by half a pixel so that
    # floor() gives the left/top neighbour for bilinear splatting.
    px = (xr - x_min[None, :, None]) * zoom.astype(np.float32)[None, :, None] + (off_x - 0.5).astype(np.float32)[None, :, None]
    py = (yr - y_min[None, :, None]) * zoom.astype(np.float32)[None, :, None] + (off_y - 0.5).astype(np.float32)[None, :, None]

    ix = np.floor(px)
    iy = np.floor(py)
    fx = px - ix
    fy = py - iy
    # The margin keeps every point at least half a pixel inside the frame, so the clips only guard
    # against float rounding (and frames a pixel or two wide, where there is no margin to keep).
    img = np.arange(n, dtype=np.int64)[None, :, None] * (height * width)
    ix = ix.astype(np.int64)
    iy = iy.astype(np.int64)
    cols = (np.clip(ix, 0, width - 1), np.clip(ix + 1, 0, width - 1))
    rows = (img + np.clip(iy, 0, height - 1) * width, img + np.clip(iy + 1, 0, height - 1) * width)
    wxs = (1.0 - fx, fx)
    wys = (1.0 - fy, fy)

    bins = n * height * width
    hits = np.zeros(bins, np.float64)
    hits_pm = np.zeros(bins * MAX_MAPS, np.float64) if per_map else None
    map_idx = maps.astype(np.int64).ravel() if per_map else None
    # Bilinear splat: each point adds to its four neighbouring pixels with weights summing to one,
    # which anti-aliases the thin strokes instead of producing jagged single-pixel dots.
    for row, wy in zip(rows, wys):
        for col, wx in zip(cols, wxs):
            flat = (row + col).ravel()
            w = (wx * wy).ravel()
            hits += np.bincount(flat, weights=w, minlength=bins)
            if per_map:
                hits_pm += np.bincount(flat * MAX_MAPS + map_idx, weights=w, minlength=bins * MAX_MAPS)
    hits = hits.astype(np.float32).reshape(n, height, width)
    if per_map:
        return hits, hits_pm.astype(np.float32).reshape(n, height, width, MAX_MAPS)
    return hits, None


def _random_colours(rng: np.random.Generator, n: int, channels: int) -> np.ndarray:
    """Random saturated colours ``(n, MAX_MAPS, channels)`` with the brightest channel at 1."""
    if channels == 3:
        # Vivid hues via HSV (value 1, saturation 0.4..1), like FractalDB's colour renders.
        h = rng.random((n, MAX_MAPS)) * 6.0
        sat = rng.uniform(0.4, 1.0, (n, MAX_MAPS))
        k = (np.array([5.0, 3.0, 1.0]) + h[..., None]) % 6.0
        return 1.0 - sat[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
    col = rng.uniform(0.2, 1.0, (n, MAX_MAPS, channels))
    return col / col.max(axis=-1, keepdims=True)


@register_source("fractal")
class FractalSource(DataSource):
    """Procedural IFS fractal images labelled by their system (see the module docstring).

    ``arg`` is the number of systems K as a decimal integer (default 64, at most 10000).  The
    systems are drawn once per process when first needed: about 0.1 s for 64, roughly 1 s per
    1000 systems beyond that.
    """

    finite = False

    def __init__(self, spec: str, arg: str | None = None) -> None:
        super().__init__(spec, arg)
        if arg is None or arg == "":
            k = DEFAULT_SYSTEMS
        else:
            try:
                k = int(arg)
            except ValueError:
                raise EvoquantError(f"bad fractal class count '{arg}' in '{spec}'; expected fractal:K with K an integer") from None
            if not 1 <= k <= MAX_SYSTEMS:
                raise EvoquantError(f"fractal class count must be between 1 and {MAX_SYSTEMS}, got {k} in '{spec}'")
        self.num_systems = k
        # Drawn now (cached per process) so sample() timings only measure rendering.
        self._systems = _BANK.first(k)

    def _sample01(self, n, shape, rng):
        channels, height, width = shape
        k = self.num_systems
        # Balanced labels: every system appears n // K or n // K + 1 times, in random order, so a
        # calibration batch covers as many different structures as it can.
        labels = rng.permutation(np.arange(n) % k)
        aug = _Augment.random(n, rng)
        gain = rng.uniform(*_GAIN_RANGE, n).astype(np.float32)
        background = rng.uniform(*_BACKGROUND_RANGE, n).astype(np.float32)
        colours = _random_colours(rng, n, channels).astype(np.float32) if channels > 1 else None

        n_points = int(min(_MAX_POINTS, max(_MIN_POINTS, _POINTS_PER_PIXEL * height * width)))
        per_chunk = max(1, _CHUNK_POINTS // n_points)
        images = np.empty((n, channels, height, width), np.float32)
        for lo in range(0, n, per_chunk):
            sl = slice(lo, min(n, lo + per_chunk))
            hits, hits_pm = _render(self._systems, labels[sl], aug.take(sl), height, width, n_points, rng,
                                    per_map=colours is not None)
            # Density normaliser: mean hit count over the lit pixels of each image.
            lit = hits > 0.05
            density = hits.sum(axis=(1, 2)) / np.maximum(lit.sum(axis=(1, 2)), 1)
            intensity = 1.0 - np.exp(-hits / (_DENSITY_SOFTNESS * density[:, None, None]))
            bg = background[sl, None, None, None]
            scale = (gain[sl] - background[sl])[:, None, None, None]
            if colours is None:
                images[sl] = bg + scale * intensity[:, None]
            else:
                # Mean colour of the points that landed on each pixel, weighted by their maps.
                colour = np.einsum("nhwm,nmc->nchw", hits_pm, colours[sl]) / np.maximum(hits, 1e-6)[:, None]
                images[sl] = bg + scale * intensity[:, None] * colour
        return images, labels
