"""Tests of evoquant.data: the source contract, the spec parser and every source kind.

Every registered built-in source is run through the generic contract tests automatically (they are
parametrised over ``list_sources()``), so a new ``@register_source`` is covered the moment it exists.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from evoquant.data import Batch, DataSource, list_sources, load_source, register_source
from evoquant.data import registry
from evoquant.errors import EvoquantError

BUILTINS = list_sources()


@pytest.fixture(scope="module")
def builtin_spec(tmp_path_factory):
    """``builtin_spec(name, shape)``: the spec that builds built-in ``name`` for images of ``shape``.

    Most built-ins work without an argument. ``gan`` needs a generator whose images have the requested
    shape: a tiny linear generator written in code (tests/generators.py). A new built-in that needs an
    argument fails the generic tests until it is given one here -- on purpose.
    """
    from tests.generators import write_linear_generator

    made: dict[tuple, str] = {}

    def spec(name: str, shape: tuple[int, int, int]) -> str:
        if name != "gan":
            return name
        if shape not in made:
            made[shape] = f"gan:{write_linear_generator(tmp_path_factory.mktemp('gan'), shape, classes=4)}"
        return made[shape]

    return spec


# ---------------------------------------------------------------------------------------------
# Generic contract of every registered built-in source
# ---------------------------------------------------------------------------------------------

def test_builtins_are_registered_and_sorted():
    assert {"fractal", "noise", "gan"} <= set(BUILTINS)
    assert BUILTINS == sorted(BUILTINS)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("shape", [(1, 12, 12), (3, 10, 14)])
def test_builtin_shape_dtype_range(name, shape, builtin_spec):
    spec = builtin_spec(name, shape)
    source = load_source(spec)
    assert isinstance(source, DataSource)
    assert source.name == name and source.spec == spec and source.finite is False
    batch = source.sample(6, shape, seed=0)
    assert isinstance(batch, Batch)
    assert batch.images.shape == (6, *shape)
    assert batch.images.dtype == np.float32
    assert batch.images.flags["C_CONTIGUOUS"]
    assert np.isfinite(batch.images).all()
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    # Not a constant image: a source must actually produce content.
    assert batch.images.std() > 0.01


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_custom_value_range_is_linear_map(name, builtin_spec):
    source = load_source(builtin_spec(name, (1, 9, 9)))
    unit = source.sample(5, (1, 9, 9), seed=3).images
    signed = source.sample(5, (1, 9, 9), seed=3, value_range=(-1.0, 1.0)).images
    assert signed.dtype == np.float32
    assert signed.min() >= -1.0 and signed.max() <= 1.0
    np.testing.assert_allclose(signed, unit * 2.0 - 1.0, atol=1e-6)
    shifted = source.sample(5, (1, 9, 9), seed=3, value_range=(-0.5, 2.5)).images
    assert shifted.min() >= -0.5 and shifted.max() <= 2.5
    np.testing.assert_allclose(shifted, unit * 3.0 - 0.5, atol=1e-5)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_deterministic_for_same_seed(name, builtin_spec):
    spec = builtin_spec(name, (3, 8, 8))
    a = load_source(spec).sample(7, (3, 8, 8), seed=42)
    b = load_source(spec).sample(7, (3, 8, 8), seed=42)  # a fresh source object: no hidden state
    np.testing.assert_array_equal(a.images, b.images)
    if a.labels is None:
        assert b.labels is None
    else:
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_different_seeds_differ(name, builtin_spec):
    source = load_source(builtin_spec(name, (1, 16, 16)))
    a = source.sample(4, (1, 16, 16), seed=1).images
    b = source.sample(4, (1, 16, 16), seed=2).images
    assert not np.array_equal(a, b)
    # Every image differs, not just one of them.
    assert all(not np.array_equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_labels_shape_and_dtype(name, builtin_spec):
    batch = load_source(builtin_spec(name, (1, 8, 8))).sample(9, (1, 8, 8), seed=0)
    if batch.labels is not None:
        assert batch.labels.shape == (9,)
        assert batch.labels.dtype == np.int64
        assert (batch.labels >= 0).all()


def test_batch_is_frozen():
    batch = load_source("noise").sample(1, (1, 2, 2), seed=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.images = np.zeros(1)  # type: ignore[misc]
    assert len(batch) == 1


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(n=0, shape=(1, 4, 4), seed=0),
        dict(n=2.5, shape=(1, 4, 4), seed=0),
        dict(n=2, shape=(4, 4), seed=0),
        dict(n=2, shape=(1, 0, 4), seed=0),
        dict(n=2, shape=(1, 4, 4), seed=-1),
        dict(n=2, shape=(1, 4, 4), seed=0, value_range=(1.0, 0.0)),
        dict(n=2, shape=(1, 4, 4), seed=0, value_range=(0.0, float("nan"))),
    ],
)
def test_bad_sample_requests_raise(kwargs):
    with pytest.raises(EvoquantError):
        load_source("noise").sample(**kwargs)


def test_register_source_adds_a_builtin(monkeypatch):
    # Work on a copy of the registry so the test source does not leak into other tests.
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register_source("constant")
    class Constant(DataSource):
        def _sample01(self, n, shape, rng):
            return np.full((n, *shape), float(self.arg or 0.25), np.float32), None

    assert "constant" in list_sources()
    source = load_source("constant:0.5")
    assert isinstance(source, Constant) and source.name == "constant"
    batch = source.sample(2, (1, 3, 3), seed=0, value_range=(0.0, 255.0))
    np.testing.assert_allclose(batch.images, 127.5)
    assert batch.labels is None


# ---------------------------------------------------------------------------------------------
# Spec parsing
# ---------------------------------------------------------------------------------------------

def test_unknown_name_lists_registered_sources():
    with pytest.raises(EvoquantError) as err:
        load_source("mnist")
    message = str(err.value)
    assert "mnist" in message
    for name in BUILTINS:
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize("spec", ["missing.npz", "some/dir/data.npz", "no/such/folder"])
def test_missing_path_is_no_such_file(spec):
    with pytest.raises(EvoquantError, match="no such file"):
        load_source(spec)


@pytest.mark.parametrize("spec", ["", "   "])
def test_empty_spec_raises(spec):
    with pytest.raises(EvoquantError):
        load_source(spec)


def test_existing_non_npz_file_raises(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2,3\n")
    with pytest.raises(EvoquantError, match="npz"):
        load_source(str(path))


def test_names_are_case_insensitive_and_trimmed():
    assert load_source(" Noise:Gaussian ").name == "noise"


# ---------------------------------------------------------------------------------------------
# Fractal source
# ---------------------------------------------------------------------------------------------

def test_fractal_labels_are_system_indices_and_balanced():
    batch = load_source("fractal:5").sample(20, (1, 16, 16), seed=0)
    assert set(batch.labels.tolist()) == set(range(5))
    assert np.bincount(batch.labels).tolist() == [4] * 5
    default = load_source("fractal").sample(128, (1, 8, 8), seed=0)
    assert default.labels.max() < 64 and len(set(default.labels.tolist())) == 64


def test_fractal_system_set_is_fixed_and_prefix_stable():
    from evoquant.data import fractal

    small = load_source("fractal:4")._systems
    full = load_source("fractal:64")._systems
    # fractal:K is a prefix of fractal:K' (the systems come from one fixed-seed stream) ...
    np.testing.assert_array_equal(small.params, full.params[: len(small) * fractal.MAX_MAPS])
    # ... and a fresh bank (as in a new process) draws exactly the same systems.
    fresh = fractal._SystemBank().first(64)
    np.testing.assert_array_equal(fresh.params, full.params)
    np.testing.assert_array_equal(fresh.cum, full.cum)


@pytest.mark.parametrize("spec", ["fractal:abc", "fractal:0", "fractal:-3", "fractal:100000", "fractal:2.5"])
def test_fractal_bad_class_count_raises(spec):
    with pytest.raises(EvoquantError, match="fractal"):
        load_source(spec)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_fractal_images_are_bright_structures_on_dark_background(shape):
    images = load_source("fractal").sample(64, shape, seed=5).images
    brightest = images.max(axis=1)  # over channels
    bright_fraction = (brightest > 0.5).mean(axis=(1, 2))
    # Strokes, not noise (would be ~50% bright) and not a dot (well under 1%).
    assert (bright_fraction > 0.02).all() and (bright_fraction < 0.6).all()
    # The structure fills a good part of the frame but leaves a dark border like MNIST digits.
    assert brightest[:, :2, :].max() <= 0.1 + 1e-6 and brightest[:, :, -2:].max() <= 0.1 + 1e-6
    assert (brightest.max(axis=(1, 2)) > 0.7).all()
    if shape[0] == 3:
        # Coloured: channels are not all identical.
        assert np.abs(images[:, 0] - images[:, 1]).max() > 0.1


# ---------------------------------------------------------------------------------------------
# Noise source
# ---------------------------------------------------------------------------------------------

def test_noise_kinds():
    uniform = load_source("noise:uniform").sample(8, (1, 32, 32), seed=0).images
    default = load_source("noise").sample(8, (1, 32, 32), seed=0).images
    gaussian = load_source("noise:gaussian").sample(8, (1, 32, 32), seed=0).images
    np.testing.assert_array_equal(uniform, default)
    assert abs(uniform.mean() - 0.5) < 0.02 and abs(uniform.std() - 12 ** -0.5) < 0.02
    assert abs(gaussian.mean() - 0.5) < 0.02
    # Centre-heavy: far more values near the middle than uniform noise has.
    assert (np.abs(gaussian - 0.5) < 0.1).mean() > 1.5 * (np.abs(uniform - 0.5) < 0.1).mean()
    assert load_source("noise:gaussian").sample(2, (1, 4, 4), seed=0).labels is None


def test_noise_bad_kind_raises():
    with pytest.raises(EvoquantError, match="noise"):
        load_source("noise:pink")


# ---------------------------------------------------------------------------------------------
# npz source
# ---------------------------------------------------------------------------------------------

def _save(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def test_npz_uint8_nhwc_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(10, 8, 6, 3), dtype=np.uint8)
    path = _save(tmp_path, x=x, y=np.arange(10))
    source = load_source(path)
    assert source.name == "npz" and source.finite is True and source.spec == path
    batch = source.sample(10, (3, 8, 6), seed=0)
    assert batch.images.shape == (10, 3, 8, 6) and batch.images.dtype == np.float32
    assert batch.labels.dtype == np.int64
    # Labels identify the stored row: images must be that row, NHWC -> NCHW, divided by 255.
    expected = x[batch.labels].transpose(0, 3, 1, 2) / 255.0
    np.testing.assert_allclose(batch.images, expected, atol=1e-6)


def test_npz_float_nchw_round_trip_with_alternative_keys(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.random((6, 3, 5, 5))
    labels = np.array([3, 1, 4, 1, 5, 9], dtype=np.int32)
    path = _save(tmp_path, images=x, labels=labels)
    batch = load_source(path).sample(4, (3, 5, 5), seed=7)
    assert batch.labels.dtype == np.int64
    # Find each sampled image among the stored ones and check its label came along.
    for image, label in zip(batch.images, batch.labels):
        row = int(np.argmin(np.abs(x - image).reshape(6, -1).max(axis=1)))
        np.testing.assert_allclose(image, x[row], atol=1e-6)
        assert label == labels[row]


def test_npz_grayscale_nhw_and_channel_adaptation(tmp_path):
    x = np.arange(4 * 3 * 3, dtype=np.uint8).reshape(4, 3, 3) * 7
    path = _save(tmp_path, x=x)
    gray = load_source(path).sample(4, (1, 3, 3), seed=0)
    assert gray.labels is None
    assert gray.images.shape == (4, 1, 3, 3)
    rgb = load_source(path).sample(4, (3, 3, 3), seed=0)
    # 1 -> 3 channels: the gray value repeated, same images in the same order.
    for c in range(3):
        np.testing.assert_array_equal(rgb.images[:, c], gray.images[:, 0])
    assert sorted(gray.images.reshape(4, -1)[:, 0].tolist()) == pytest.approx(
        sorted((x.reshape(4, -1)[:, 0] / 255.0).tolist()))


def test_npz_rgb_to_gray_uses_luminance(tmp_path):
    x = np.zeros((1, 3, 2, 2), np.float32)
    x[0, 0] = 1.0  # pure red
    path = _save(tmp_path, x=x)
    gray = load_source(path).sample(1, (1, 2, 2), seed=0).images
    np.testing.assert_allclose(gray, 0.299, atol=1e-6)


def test_npz_value_range(tmp_path):
    x = np.array([[[0, 255]]], dtype=np.uint8)  # (1, 1, 2) grayscale
    path = _save(tmp_path, x=x)
    images = load_source(path).sample(1, (1, 1, 2), seed=0, value_range=(-1.0, 1.0)).images
    np.testing.assert_allclose(images.ravel(), [-1.0, 1.0])


def test_npz_samples_without_replacement(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, size=(50, 1, 4, 4), dtype=np.uint8)
    path = _save(tmp_path, x=x)
    source = load_source(path)
    batch = source.sample(50, (1, 4, 4), seed=3)
    rows = batch.images.reshape(50, -1)
    assert len(np.unique(rows, axis=0)) == 50
    # Exactly the stored set, in a seed-dependent order.
    stored = (x.reshape(50, -1) / 255.0).astype(np.float32)
    np.testing.assert_allclose(np.unique(rows, axis=0), np.unique(stored, axis=0), atol=1e-6)
    again = source.sample(50, (1, 4, 4), seed=3).images
    other = source.sample(50, (1, 4, 4), seed=4).images
    np.testing.assert_array_equal(batch.images, again)
    assert not np.array_equal(batch.images, other)


def test_npz_too_many_requested(tmp_path):
    path = _save(tmp_path, x=np.zeros((10, 1, 4, 4), np.uint8))
    with pytest.raises(EvoquantError, match="holds 10 images; 11 were requested"):
        load_source(path).sample(11, (1, 4, 4), seed=0)


def test_npz_wrong_spatial_size(tmp_path):
    path = _save(tmp_path, x=np.zeros((3, 32, 32, 3), np.uint8))
    with pytest.raises(EvoquantError, match="has images of 32x32 but the model takes 28x28"):
        load_source(path).sample(2, (3, 28, 28), seed=0)


@pytest.mark.parametrize(
    "x, dtype_name",
    [
        (np.zeros((2, 1, 3, 3), np.complex64), "complex64"),
        (np.zeros((2, 1, 3, 3), bool), "bool"),
        (np.full((2, 1, 3, 3), "a"), "<U1"),
        (np.zeros((2, 1, 3, 3), np.int64), "int64"),
    ],
)
def test_npz_bad_dtype(tmp_path, x, dtype_name):
    path = _save(tmp_path, x=x)
    with pytest.raises(EvoquantError, match="dtype") as err:
        load_source(path)
    assert dtype_name in str(err.value)


def test_npz_object_dtype(tmp_path):
    x = np.empty(2, dtype=object)
    x[0], x[1] = np.zeros((3, 3)), "text"
    path = _save(tmp_path, x=x)
    with pytest.raises(EvoquantError, match="object"):
        load_source(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_npz_non_finite(tmp_path, bad):
    x = np.zeros((2, 1, 3, 3), np.float32)
    x[1, 0, 1, 1] = bad
    with pytest.raises(EvoquantError, match="NaN or infinite"):
        load_source(_save(tmp_path, x=x))


def test_npz_float_out_of_unit_range(tmp_path):
    x = np.full((2, 1, 3, 3), 200.0, np.float32)
    with pytest.raises(EvoquantError, match=r"\[0, 1\]"):
        load_source(_save(tmp_path, x=x))


def test_npz_missing_file(tmp_path):
    with pytest.raises(EvoquantError, match="no such file"):
        load_source(str(tmp_path / "absent.npz"))


def test_npz_not_a_valid_archive(tmp_path):
    path = tmp_path / "broken.npz"
    path.write_bytes(b"this is not a zip file at all")
    with pytest.raises(EvoquantError, match="not a valid .npz"):
        load_source(str(path))


def test_npz_single_npy_array_named_npz(tmp_path):
    path = tmp_path / "array.npz"
    with open(path, "wb") as fh:
        np.save(fh, np.zeros((2, 1, 3, 3), np.uint8))
    with pytest.raises(EvoquantError, match="not a .npz archive"):
        load_source(str(path))


def test_npz_without_image_key(tmp_path):
    with pytest.raises(EvoquantError, match="'x' or 'images'"):
        load_source(_save(tmp_path, data=np.zeros((2, 3, 3), np.uint8)))


@pytest.mark.parametrize("shape", [(2, 3, 3, 3, 3), (5, 3), (2, 4, 5, 5), (2, 5, 5, 2)])
def test_npz_bad_image_shape(tmp_path, shape):
    with pytest.raises(EvoquantError, match="shape"):
        load_source(_save(tmp_path, x=np.zeros(shape, np.uint8)))


def test_npz_bad_labels(tmp_path):
    x = np.zeros((4, 1, 2, 2), np.uint8)
    with pytest.raises(EvoquantError, match="labels"):
        load_source(_save(tmp_path, "a.npz", x=x, y=np.arange(3)))
    with pytest.raises(EvoquantError, match="labels"):
        load_source(_save(tmp_path, "b.npz", x=x, y=np.array([0.5, 1, 2, 3])))
    with pytest.raises(EvoquantError, match="labels"):
        load_source(_save(tmp_path, "c.npz", x=x, y=np.array([0, -1, 2, 3])))


# ---------------------------------------------------------------------------------------------
# Folder source
# ---------------------------------------------------------------------------------------------

def _png(path, value, size=(6, 6), mode="L"):
    colour = value if mode == "L" else (value, 255 - value, 0)
    Image.new(mode, size, colour).save(path)


def test_folder_with_class_subfolders(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "dog").mkdir()
    for i in range(3):
        _png(tmp_path / "cat" / f"{i}.png", 20)
    for i in range(2):
        _png(tmp_path / "dog" / f"{i}.PNG", 230, size=(9, 5))
    (tmp_path / "dog" / "notes.txt").write_text("ignored")
    source = load_source(str(tmp_path))
    assert source.name == "folder" and source.finite is True
    assert source.classes == ["cat", "dog"]
    batch = source.sample(5, (1, 4, 4), seed=0)
    assert batch.images.shape == (5, 1, 4, 4) and batch.images.dtype == np.float32
    assert batch.labels.dtype == np.int64
    assert sorted(batch.labels.tolist()) == [0, 0, 0, 1, 1]
    # Each image's content matches its class folder (uniform images survive resizing exactly).
    for image, label in zip(batch.images, batch.labels):
        np.testing.assert_allclose(image, (20 if label == 0 else 230) / 255.0, atol=1e-6)
    with pytest.raises(EvoquantError, match="holds 5 images; 6 were requested"):
        source.sample(6, (1, 4, 4), seed=0)


def test_flat_folder_has_no_labels_and_resizes(tmp_path):
    for i, value in enumerate([0, 100, 200]):
        _png(tmp_path / f"img{i}.png", value, size=(10, 8), mode="RGB")
    source = load_source(str(tmp_path))
    batch = source.sample(3, (3, 5, 7), seed=1)
    assert batch.labels is None
    assert batch.images.shape == (3, 3, 5, 7)
    # Red channel carries the value, green its complement: RGB order and scaling preserved.
    reds = sorted(float(v) for v in batch.images[:, 0, 0, 0])
    assert reds == pytest.approx([0.0, 100 / 255, 200 / 255], abs=1e-6)
    np.testing.assert_allclose(batch.images[:, 1], 1.0 - batch.images[:, 0], atol=1e-6)
    gray = source.sample(3, (1, 5, 7), seed=1).images
    assert gray.shape == (3, 1, 5, 7)
    np.testing.assert_array_equal(source.sample(3, (3, 5, 7), seed=1).images, batch.images)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(EvoquantError, match="no images"):
        load_source(str(tmp_path))
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(EvoquantError, match="no images"):
        load_source(str(tmp_path))


def test_folder_with_empty_class_raises(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _png(tmp_path / "a" / "x.png", 10)
    with pytest.raises(EvoquantError, match="no images"):
        load_source(str(tmp_path))


def test_folder_mixing_files_and_classes_raises(tmp_path):
    (tmp_path / "a").mkdir()
    _png(tmp_path / "a" / "x.png", 10)
    _png(tmp_path / "loose.png", 10)
    with pytest.raises(EvoquantError, match="mixes"):
        load_source(str(tmp_path))


def test_folder_corrupt_image_raises_on_sample(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    source = load_source(str(tmp_path))
    with pytest.raises(EvoquantError, match="cannot read image"):
        source.sample(1, (1, 4, 4), seed=0)


def test_folder_rejects_unsupported_channel_count(tmp_path):
    _png(tmp_path / "a.png", 10)
    with pytest.raises(EvoquantError, match="channels"):
        load_source(str(tmp_path)).sample(1, (4, 4, 4), seed=0)


def test_sixteen_bit_pngs_keep_their_full_range(tmp_path):
    """A 16-bit grayscale PNG is read as 0..65535 scaled to [0, 1] (converting it to 8-bit mode clips it to 0/1)."""
    from PIL import Image

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    for label in ("0", "1"):
        (tmp_path / label).mkdir()
        Image.fromarray(ramp).save(tmp_path / label / "ramp.png")
    images = load_source(str(tmp_path)).sample(2, (1, 32, 32), seed=0).images
    np.testing.assert_allclose(images[0, 0], ramp / 65535.0, atol=1e-6)
    rgb = load_source(str(tmp_path)).sample(1, (3, 16, 16), seed=0).images
    assert rgb.shape == (1, 3, 16, 16) and 0.45 < rgb.mean() < 0.55
