"""Data-free synthesis: the instrumented teacher, the methods' losses (ClusterQ's two public-code defects,
Qimera's superposition), ZeroQ and the generator methods end to end on a tiny model, through the CLI."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import evoquant  # noqa: E402
from evoquant import EvoquantError  # noqa: E402
from evoquant.dfq import MethodOptions, load_teacher  # noqa: E402
from evoquant.dfq.losses import ClassCentroids, bns_loss, superpose  # noqa: E402
from test_cli import run_cli  # noqa: E402

SHAPE = (1, 8, 8)


def tiny_classifier(seed: int = 0, norm: bool = True):
    torch.manual_seed(seed)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4) if norm else torch.nn.Identity(), torch.nn.ReLU(),
              torch.nn.Conv2d(4, 6, 3, stride=2, padding=1), torch.nn.BatchNorm2d(6) if norm else torch.nn.Identity(), torch.nn.ReLU(),
              torch.nn.Flatten(), torch.nn.Linear(6 * 4 * 4, 5)]
    model = torch.nn.Sequential(*layers)
    if norm:  # running statistics as training leaves them: those of a data set (dark images with bright specks)
        images = torch.rand(256, *SHAPE, generator=torch.Generator().manual_seed(5)) ** 3
        for module in model:
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None
        model.train()
        with torch.no_grad():
            model(images)
    return model.eval()


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    from evoquant.dfq import export_program

    path = tmp_path_factory.mktemp("dfq") / "fp32.pt2"
    torch.export.save(export_program(tiny_classifier(), SHAPE), str(path))
    return path


def test_the_teacher_reads_every_batchnorm_and_passes_gradients(program):
    teacher = load_teacher(program)
    assert (teacher.input_shape, teacher.layers, teacher.num_classes) == (SHAPE, 2, 5)
    images = torch.rand(16, *SHAPE, requires_grad=True)
    logits, stats = teacher(images)
    expected = tiny_classifier()(images)
    torch.testing.assert_close(logits, expected)
    assert [tuple(layer.mean.shape) for layer in stats] == [(4,), (6,)]
    torch.testing.assert_close(stats[0].running_mean, tiny_classifier()[1].running_mean)
    bns_loss(stats).backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    module_teacher = load_teacher(tiny_classifier(), SHAPE)  # an nn.Module from Python takes the same path
    torch.testing.assert_close(module_teacher(images)[0], expected)
    assert teacher.classifier_weight().shape == (5, 96)


def test_teachers_it_cannot_use_are_one_line_errors(tmp_path, program):
    from evoquant.dfq import export_program

    plain = tmp_path / "nobn.pt2"
    torch.export.save(export_program(tiny_classifier(norm=False), SHAPE), str(plain))
    with pytest.raises(EvoquantError, match="no BatchNorm"):
        load_teacher(plain)
    scripted = tmp_path / "model.pt"
    torch.save(tiny_classifier().state_dict(), str(scripted))
    with pytest.raises(EvoquantError, match="torch.export"):
        load_teacher(scripted)
    with pytest.raises(EvoquantError, match="does not take inputs of shape"):
        load_teacher(program, (3, 8, 8))
    code, _, stderr = run_cli("datafree", "--teacher", str(plain), "--method", "gdfq", "-o", str(tmp_path / "gen"))
    assert code == 2 and stderr.count("\n") == 1 and "no BatchNorm" in stderr
    code, _, stderr = run_cli("datafree", "--teacher", str(program), "--method", "gdfq", "-o", str(tmp_path / "gen.npz"))
    assert code == 2 and stderr.count("\n") == 1 and "not an .npz" in stderr
    # generator settings from the command line: an unknown name, a pair without '=', a bad value
    for setting, message in (("colour=red", "known: latent_size"), ("width", "not KEY=VALUE"), ("tv_weight=-1", "image prior weights")):
        code, _, stderr = run_cli("datafree", "--teacher", str(program), "--method", "gdfq", "--set", setting, "-o", str(tmp_path / "set"))
        assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
        assert not (tmp_path / "set").exists()


def test_generator_settings_from_the_command_line_reach_the_generator(program, tmp_path):
    code, stdout, stderr = run_cli("datafree", "--teacher", str(program), "--method", "clusterq", "--steps", "2", "--batch-size", "8", "-q",
                              "--set", "width=4", "--set", "latent_size=8", "--set", "tv_weight=0.1", "-o", str(tmp_path / "gen"))
    assert code == 0, stderr
    import json

    options = json.loads((tmp_path / "gen" / "generator.json").read_text())["settings"]["options"]
    assert options["width"] == 4 and options["latent_size"] == 8 and options["tv_weight"] == 0.1 and options["embedding"] == "random"
    assert options["bns"] == "absolute"  # a generator method's default statistics loss: the papers'
    assert "clusterq, 2 steps, absolute statistics loss" in stdout


def test_clusterq_centroids_are_per_class_and_never_the_global_statistics():
    """Fails on the public code's first defect: centroids filled from the layer's running statistics."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(12, 3, 4, 4, generator=generator)
    labels = torch.tensor([0, 1, 2] * 4)
    features[labels == 1] += 3.0  # class 1 sits far from the others
    running_mean, running_var = torch.zeros(3), torch.ones(3)
    layer = type("Stats", (), {"features": features, "running_mean": running_mean, "running_var": running_var})
    centroids = ClassCentroids(num_classes=4, layers=[0], decay=0.2)
    correct = torch.tensor([True] * 11 + [False])
    centroids.update([layer], labels, correct)
    assert not centroids.filled[0][3]  # a class never seen correctly has no centroid (not the global one)
    class_one = features[(labels == 1) & correct].mean(dim=(0, 2, 3))
    torch.testing.assert_close(centroids.mean[0][1], class_one)
    assert not torch.allclose(centroids.mean[0][1], running_mean, atol=0.5)
    assert not torch.allclose(centroids.mean[0][0], centroids.mean[0][1])
    centroids.update([layer], labels, correct)  # EMA: decay * old + (1 - decay) * new, with new == old here
    torch.testing.assert_close(centroids.mean[0][1], class_one)
    shifted = type("Stats", (), {"features": features + 1.0, "running_mean": running_mean, "running_var": running_var})
    centroids.update([shifted], labels, correct)
    torch.testing.assert_close(centroids.mean[0][1], class_one + 0.8)
    # the clustered loss is not the plain BNS loss in disguise
    assert abs(float(centroids.loss([layer], labels)) - float(bns_loss([type("S", (), {"mean": features.mean((0, 2, 3)), "var": features.var((0, 2, 3), unbiased=False), "running_mean": running_mean, "running_var": running_var})]))) > 1e-3


def test_clusterq_diversity_moves_the_target_only():
    """Fails on the public code's second defect: a diversity term whose gradient is zero (shifting the batch
    statistics and the target together)."""
    features = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1] * 4)
    centroids = ClassCentroids(num_classes=2, layers=[0])
    centroids.update([type("S", (), {"features": features})], labels, torch.ones(8, dtype=torch.bool))
    gradients = []
    for diversity in (0.0, 1.0):
        leaf = features.clone().requires_grad_(True)
        centroids.loss([type("S", (), {"features": leaf})], labels, diversity=diversity, generator=torch.Generator().manual_seed(2)).backward()
        gradients.append(leaf.grad)
    assert gradients[0].abs().max() < 1e-6  # on the centroid: nothing to pull
    assert gradients[1].abs().max() > 1e-3  # the perturbed target pulls the batch: a real gradient


def test_qimera_superposed_samples_carry_soft_labels_of_the_classes_drawn():
    drawn = superpose(200, 10, probability=0.4, k=2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(drawn.targets.sum(dim=1), torch.ones(200))
    assert 0.25 < drawn.mixed.float().mean() < 0.55
    for i in range(200):
        support = set(torch.nonzero(drawn.targets[i]).flatten().tolist())
        if drawn.mixed[i]:
            assert support == set(drawn.classes[i].tolist()) and len(support) == 2
            assert drawn.targets[i].max() < 1.0
        else:
            assert support == {int(drawn.classes[i, 0])} and drawn.targets[i].max() == 1.0


@pytest.mark.parametrize("method, steps, shrink", [("zeroq", 40, 0.1), ("genie", 60, 0.3)])  # genie trades some BNS for its class term
def test_image_methods_match_the_statistics_and_resume_to_the_same_images(program, tmp_path, method, steps, shrink):
    from evoquant.dfq.synthesis import distilled_images

    teacher = load_teacher(program)
    start = torch.sigmoid(torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(3)))
    before = float(bns_loss(teacher(start)[1], std=True))
    images, labels = distilled_images(teacher, 16, method=method, steps=steps, batch_size=8, progress=False, mixes=0)
    after = float(bns_loss(teacher(torch.from_numpy(images))[1], std=True))
    assert after < shrink * before and images.min() >= 0 and images.max() <= 1 and labels.max() < 5
    if method == "genie":  # classes dealt evenly: the model sees most of them among 16 images
        assert len(set(labels.tolist())) >= 4, labels
    result = evoquant.datafree(program, method=method, output=tmp_path / "z.npz", n=16, steps=steps, batch_size=8, progress=False, mixes=0)
    with np.load(tmp_path / "z.npz") as archive:
        np.testing.assert_array_equal(archive["x"], images)
        np.testing.assert_array_equal(archive["y"], labels)
    assert result.data_spec.endswith("z.npz") and result.images == 16 and not list(tmp_path.glob(".*partial*"))
    # interrupted after the first batch: the partial file holds it, a resumed run finishes identically
    distilled_images(teacher, 8, method=method, steps=steps, batch_size=8, mixes=0, progress=False, partial=tmp_path / ".r.npz.partial.npz")
    evoquant.datafree(program, method=method, output=tmp_path / "r.npz", n=16, steps=steps, batch_size=8, progress=False, resume=True, mixes=0)
    with np.load(tmp_path / "r.npz") as archive:
        np.testing.assert_array_equal(archive["x"], images)
    # the other image method's partial file is not taken for this one's
    other = "genie" if method == "zeroq" else "zeroq"
    distilled_images(teacher, 8, method=other, steps=steps, batch_size=8, mixes=0, progress=False, partial=tmp_path / ".o.npz.partial.npz")
    evoquant.datafree(program, method=method, output=tmp_path / "o.npz", n=16, steps=steps, batch_size=8, progress=False, resume=True, mixes=0)
    with np.load(tmp_path / "o.npz") as archive:
        np.testing.assert_array_equal(archive["x"], images)
    # generator settings do not apply to image methods: refused, not ignored
    with pytest.raises(EvoquantError, match="generator settings"):
        evoquant.datafree(program, method=method, output=tmp_path / "w.npz", n=8, steps=2, batch_size=8, progress=False, options=MethodOptions(width=8))
    code, _, stderr = run_cli("datafree", "--teacher", str(program), "--method", method, "--set", "width=8", "-n", "8", "-o", str(tmp_path / "c.npz"))
    assert code == 2 and stderr.count("\n") == 1 and "generator settings" in stderr and not (tmp_path / "c.npz").exists()


def test_genie_mixes_more_batches_from_each_optimised_generator(program, tmp_path):
    from evoquant.dfq.synthesis import distilled_images, mixed_latents

    # each mixed latent combines its own row and one other, scale kept: a² + b² = 1 over the two weights
    rows = torch.eye(8) * 2.0
    mixed = mixed_latents(torch, rows, torch.Generator().manual_seed(0)) / 2.0
    pairs = 0
    for i, row in enumerate(mixed):
        support = torch.nonzero(row).flatten().tolist()
        assert i in support and len(support) <= 2  # (the permutation may pair a row with itself: a rescaled copy)
        if len(support) == 2:
            pairs += 1
            assert abs(float((row**2).sum()) - 1.0) < 1e-5
    assert pairs >= 4
    gaussian = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1))
    assert abs(float(mixed_latents(torch, gaussian, torch.Generator().manual_seed(2)).std()) - 1.0) < 0.05

    teacher = load_teacher(program)
    start = torch.sigmoid(torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(3)))
    before = float(bns_loss(teacher(start)[1], std=True))
    plain, _ = distilled_images(teacher, 8, method="genie", steps=40, batch_size=8, progress=False, mixes=0)
    images, labels = distilled_images(teacher, 24, method="genie", steps=40, batch_size=8, progress=False, mixes=2)
    assert images.shape == (24, *SHAPE) and labels.shape == (24,) and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images[:8], plain)  # one optimisation: its own batch first, as without mixes
    for mix in (images[8:16], images[16:]):
        assert not np.allclose(mix, plain) and float(bns_loss(teacher(torch.from_numpy(mix))[1], std=True)) < before
    # a partial file made without mixes is not taken for a run with them (nor the other way)
    distilled_images(teacher, 8, method="genie", steps=40, batch_size=8, progress=False, partial=tmp_path / ".m.npz.partial.npz", mixes=0)
    evoquant.datafree(program, method="genie", output=tmp_path / "m.npz", n=24, steps=40, batch_size=8, mixes=2, progress=False, resume=True)
    with np.load(tmp_path / "m.npz") as archive:
        np.testing.assert_array_equal(archive["x"], images)
    # only Genie has latents to mix: refused for the others, in one line
    for method, output in (("zeroq", "z.npz"), ("gdfq", "gen")):
        code, _, stderr = run_cli("datafree", "--teacher", str(program), "--method", method, "--mixes", "2", "-o", str(tmp_path / output))
        assert code == 2 and stderr.count("\n") == 1 and "mix" in stderr and not (tmp_path / output).exists()


def _stats(mean, var, running_mean, running_var):
    return type("S", (), {"mean": torch.tensor(mean), "var": torch.tensor(var), "running_mean": torch.tensor(running_mean), "running_var": torch.tensor(running_var)})


@pytest.mark.parametrize("std", [True, False])
def test_the_relative_statistics_loss_counts_every_channel_alike(std):
    """Two channels off by the same 10 % of their spread, one 10x narrower: the relative loss weighs them alike, the
    absolute one all but ignores the narrow one."""
    wide = _stats([1.1], [1.21], [1.0], [1.0])
    narrow = _stats([0.11], [0.0121], [0.1], [0.01])
    both = _stats([1.1, 0.11], [1.21, 0.0121], [1.0, 0.1], [1.0, 0.01])
    absolute = [float(bns_loss([layer], std=std)) for layer in (wide, narrow)]
    relative = [float(bns_loss([layer], std=std, relative=True)) for layer in (wide, narrow)]
    assert absolute[1] < 0.02 * absolute[0]
    assert relative[1] == pytest.approx(relative[0], rel=0.01)
    assert float(bns_loss([both], std=std, relative=True)) == pytest.approx(sum(relative) / 2, rel=1e-5)


def test_relative_statistics_are_a_setting_of_every_method_image_methods_included(program, tmp_path):
    from evoquant.dfq.synthesis import DEFAULT_BNS, distilled_images, resolve_bns

    with pytest.raises(EvoquantError, match="bns must be absolute or relative"):
        MethodOptions(bns="squared")
    # Genie's default is the relative loss, every other method's the papers' absolute one
    assert DEFAULT_BNS == {"genie": "relative"} and resolve_bns("genie", None) == "relative" and resolve_bns("zeroq", None) == "absolute"
    assert resolve_bns("clusterq", None) == "absolute" and resolve_bns("genie", "absolute") == "absolute"
    result = evoquant.datafree(program, method="genie", output=tmp_path / "g.npz", n=8, steps=20, batch_size=8, progress=False, mixes=0,
                               options=MethodOptions(bns="relative"))
    assert result.images == 8 and result.bns == "relative"
    default = evoquant.datafree(program, method="genie", output=tmp_path / "d.npz", n=8, steps=20, batch_size=8, progress=False, mixes=0)
    plain = evoquant.datafree(program, method="genie", output=tmp_path / "p.npz", n=8, steps=20, batch_size=8, progress=False, mixes=0,
                              options=MethodOptions(bns="absolute"))
    assert default.bns == "relative" and plain.bns == "absolute"
    with np.load(tmp_path / "g.npz") as relative, np.load(tmp_path / "p.npz") as absolute, np.load(tmp_path / "d.npz") as unset:
        assert not np.allclose(relative["x"], absolute["x"])  # the setting reached the optimisation
        np.testing.assert_array_equal(unset["x"], relative["x"])  # and not giving it is the relative loss
    # an absolute run's partial images are not taken for a (default: relative) run
    distilled_images(load_teacher(program), 8, method="genie", steps=20, batch_size=8, mixes=0, progress=False, bns="absolute",
                     partial=tmp_path / ".r.npz.partial.npz")
    evoquant.datafree(program, method="genie", output=tmp_path / "r.npz", n=8, steps=20, batch_size=8, progress=False, resume=True, mixes=0)
    with np.load(tmp_path / "r.npz") as resumed, np.load(tmp_path / "g.npz") as relative:
        np.testing.assert_array_equal(resumed["x"], relative["x"])


def test_swing_shifts_what_each_strided_convolution_sees_and_nothing_else(program):
    from evoquant.dfq.teacher import swung

    teacher = load_teacher(program)
    images = torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(3))
    model = tiny_classifier()
    _, plain = teacher(images)
    _, unswung = teacher(images, swing=0, draw=torch.Generator().manual_seed(0))
    torch.testing.assert_close(unswung[1].mean, plain[1].mean)
    shifted_any = False
    for seed in range(6):
        logits, stats = teacher(images, swing=1, draw=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(stats[0].mean, plain[0].mean)  # the stride-1 convolution sees the images as they are
        dy, dx = (int(v) for v in torch.randint(0, 3, (2,), generator=torch.Generator().manual_seed(seed)))
        with torch.no_grad():
            features = model[:3](images)  # what the strided convolution takes
            moved = torch.nn.functional.pad(features, [1, 1, 1, 1], mode="reflect")[:, :, dy:dy + 8, dx:dx + 8]
            expected = model[3](moved)
        torch.testing.assert_close(stats[1].mean, expected.mean(dim=(0, 2, 3)))
        torch.testing.assert_close(logits, model[4:](expected))
        shifted_any = shifted_any or (dy, dx) != (1, 1)
    assert shifted_any
    # the shift itself: the map moves by whole pixels, its border filled by reflection; a map too small to reflect stays
    grid = torch.arange(25.0).reshape(1, 1, 5, 5)
    draw = torch.Generator().manual_seed(1)
    dy, dx = (int(v) for v in torch.randint(0, 5, (2,), generator=torch.Generator().manual_seed(1)))
    moved = swung(torch, grid, 2, draw)
    assert moved.shape == grid.shape
    torch.testing.assert_close(moved[0, 0, 2, 2], grid[0, 0, dy, dx])
    tiny = torch.ones(1, 1, 2, 2)
    assert swung(torch, tiny, 2, draw) is tiny


def test_swing_is_a_setting_of_every_method_and_names_its_data(program, tmp_path):
    from evoquant.demo import canonical_method

    for bad in (-1, 0.5, True):
        with pytest.raises(EvoquantError, match="swing must be a whole number"):
            MethodOptions(swing=bad)
    swung = evoquant.datafree(program, method="genie", output=tmp_path / "s.npz", n=8, steps=10, batch_size=8, progress=False, mixes=0,
                              options=MethodOptions(swing=1))
    evoquant.datafree(program, method="genie", output=tmp_path / "p.npz", n=8, steps=10, batch_size=8, progress=False, mixes=0)
    with np.load(swung.output) as shifted, np.load(tmp_path / "p.npz") as plain:
        assert not np.allclose(shifted["x"], plain["x"])  # the setting reached the optimisation
    with pytest.raises(EvoquantError, match="except bns and swing"):
        evoquant.datafree(program, method="genie", output=tmp_path / "w.npz", n=8, steps=10, progress=False, options=MethodOptions(width=8))
    assert canonical_method("genie:seed=0,swing=1") == "genie:seed=0,swing=1,bns=relative,mixes=3"


def test_a_genie_source_is_named_with_its_defaults():
    from evoquant.demo import canonical_method

    assert canonical_method("genie:seed=0") == "genie:seed=0,bns=relative,mixes=3" and canonical_method("genie") == "genie:bns=relative,mixes=3"
    assert canonical_method("genie:seed=0,bns=relative") == "genie:seed=0,bns=relative,mixes=3"
    assert canonical_method("genie:mixes=0,seed=1") == "genie:mixes=0,seed=1,bns=relative"
    assert canonical_method("genie:seed=0,bns=absolute") == "genie:seed=0,bns=absolute,mixes=3"
    assert canonical_method("clusterq:width=32") == "clusterq:width=32" and canonical_method("zeroq") == "zeroq"
    assert canonical_method("zeroq:bns=absolute") == "zeroq:bns=absolute"


def test_the_image_prior_is_total_variation_plus_energy_and_prefers_smooth_images():
    import torch

    from evoquant.dfq.synthesis import image_prior

    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 1.0  # one vertical edge: |dx| = 1 on 4 of 12 horizontal pairs, no vertical change
    assert image_prior(edge, tv_weight=1.0, l2_weight=0.0).item() == pytest.approx(4 / 12)
    assert image_prior(edge, tv_weight=0.0, l2_weight=1.0).item() == pytest.approx(0.5)
    checker = (torch.arange(16).reshape(1, 1, 4, 4) + torch.arange(4).reshape(1, 1, 4, 1)) % 2 * 1.0  # same energy, every pair differs
    assert image_prior(checker, tv_weight=1.0, l2_weight=0.0).item() == pytest.approx(2.0)
    pixels = checker.clone().requires_grad_(True)
    image_prior(pixels, tv_weight=0.1, l2_weight=0.1).backward()
    assert pixels.grad.abs().sum() > 0
    with pytest.raises(EvoquantError, match="image prior weights"):
        MethodOptions(tv_weight=-1)


@pytest.mark.parametrize("method, options", [("gdfq", {}), ("qimera", {}), ("qimera", {"embedding": "classifier"}), ("clusterq", {"centroid_warmup": 2}),
                                             ("clusterq", {"centroid_warmup": 2, "tv_weight": 0.1, "l2_weight": 0.1})])
def test_generator_methods_write_a_generator_any_command_can_use(program, tmp_path, method, options):
    from evoquant.data import load_source

    settings = MethodOptions(latent_size=8, width=4, **options)
    result = evoquant.datafree(program, method=method, output=tmp_path / "gen", steps=4, batch_size=8, options=settings, progress=False)
    assert result.kind == "generator" and (tmp_path / "gen" / "samples.png").is_file()
    batch = load_source(result.data_spec).sample(10, SHAPE, seed=0)
    assert batch.images.shape == (10, *SHAPE) and batch.labels.max() < 5 and 0 <= batch.images.min() and batch.images.max() <= 1
    # a run stopped at step 2 and resumed to 4 ends with the same generator
    evoquant.datafree(program, method=method, output=tmp_path / "part", steps=2, batch_size=8, options=settings, progress=False, checkpoint_every=1)
    if method == "gdfq":  # a checkpoint written before a setting existed (here swing, bns) resumes as if it held the default
        checkpoint = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
        assert checkpoint["settings"]["options"]["bns"] == "absolute"  # the method's default, spelled out
        del checkpoint["settings"]["options"]["swing"], checkpoint["settings"]["options"]["bns"]
        torch.save(checkpoint, tmp_path / "part" / "checkpoint.pt")
    evoquant.datafree(program, method=method, output=tmp_path / "part", steps=4, batch_size=8, options=settings, progress=False, resume=True)
    resumed = load_source(f"gan:{tmp_path / 'part'}").sample(10, SHAPE, seed=0)
    np.testing.assert_allclose(resumed.images, batch.images, atol=1e-5)


def test_grey_makes_one_channel_that_the_model_sees_repeated_over_its_own(program, tmp_path):
    """A network fed grey images as RGB: --grey optimises one channel, repeated over the model's three while
    optimising, and writes one-channel data that every source repeats over the model's channels."""
    from evoquant.data import load_source
    from evoquant.dfq import export_program

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 5))
    model[1].running_var.fill_(2.0)
    rgb = tmp_path / "rgb.pt2"
    torch.export.save(export_program(model.eval(), (3, 8, 8)), str(rgb))
    teacher = load_teacher(rgb, grey=True)
    assert (teacher.input_shape, teacher.image_shape) == ((3, 8, 8), (1, 8, 8))
    grey = torch.rand(4, 1, 8, 8, requires_grad=True)
    logits, stats = teacher(grey)
    torch.testing.assert_close(logits, model(grey.expand(-1, 3, -1, -1)))
    bns_loss(stats).backward()
    assert grey.grad.abs().sum() > 0
    with pytest.raises(EvoquantError, match="one channel already"):
        load_teacher(program, grey=True)
    # Genie's images: one channel written, three identical ones sampled for the model
    result = evoquant.datafree(rgb, method="genie", output=tmp_path / "g.npz", n=8, steps=5, batch_size=8, mixes=0, grey=True, progress=False)
    assert result.image_shape == (1, 8, 8)
    with np.load(result.output) as archive:
        assert archive["x"].shape == (8, 1, 8, 8)
    batch = load_source(result.data_spec).sample(8, (3, 8, 8), seed=0)
    assert batch.images.shape == (8, 3, 8, 8) and np.array_equal(batch.images[:, 0], batch.images[:, 2])
    # an RGB run's finished batches are not resumed into a grey one
    from evoquant.dfq.synthesis import distilled_images

    distilled_images(load_teacher(rgb), 8, method="genie", steps=5, batch_size=8, mixes=0, progress=False, partial=tmp_path / ".r.npz.partial.npz")
    evoquant.datafree(rgb, method="genie", output=tmp_path / "r.npz", n=8, steps=5, batch_size=8, mixes=0, grey=True, progress=False, resume=True)
    with np.load(tmp_path / "r.npz") as archive:
        assert archive["x"].shape == (8, 1, 8, 8)
    # a generator method: a one-channel generator, sampled as three identical channels
    settings = MethodOptions(latent_size=8, width=4)
    made = evoquant.datafree(rgb, method="gdfq", output=tmp_path / "gen", steps=2, batch_size=8, options=settings, grey=True, progress=False)
    sampled = load_source(made.data_spec).sample(6, (3, 8, 8), seed=0).images
    assert made.image_shape == (1, 8, 8) and np.array_equal(sampled[:, 0], sampled[:, 1])
    # from the command line: said in the summary; on a one-channel model a one-line error and nothing written
    code, stdout, _ = run_cli("datafree", "--teacher", str(rgb), "--method", "zeroq", "--steps", "2", "-n", "8", "--grey", "-o", str(tmp_path / "z.npz"))
    assert code == 0 and "grey" in stdout
    code, _, stderr = run_cli("datafree", "--teacher", str(program), "--method", "zeroq", "--grey", "-o", str(tmp_path / "one.npz"))
    assert code == 2 and stderr.count("\n") == 1 and "one channel already" in stderr and not (tmp_path / "one.npz").exists()
