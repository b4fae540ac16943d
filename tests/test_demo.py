"""The demo path end to end on one zoo model (slow: trains and quantizes a model)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_demo_refines_a_zoo_classifier_without_losing_heldout_accuracy(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOQUANT_CACHE", str(tmp_path / "cache"))
    from evoquant.demo import run_demo

    lines = []
    results = run_demo(models="bn_cnn", preset="fast", source="fractal", output_dir=str(tmp_path / "out"), progress=False, echo=lines.append)
    result = results["bn_cnn"]
    assert (tmp_path / "out" / "bn_cnn_refined.xml").exists()
    assert any("held-out accuracy" in line for line in lines)
    # refine never hands back a model that is worse on its verification images
    assert result.verification_after.kl <= result.verification_before.kl
    assert result.heldout_reference.accuracy > 0.95


def test_data_free_source_names_each_variant_and_refuses_unknown_options(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from evoquant import demo
    from evoquant.errors import EvoquantError

    monkeypatch.setenv("EVOQUANT_CACHE", str(tmp_path))
    made = []
    monkeypatch.setattr("evoquant.dfq.datafree", lambda program, **kwargs: made.append(kwargs))
    built = SimpleNamespace(name="bn_cnn", fp32_program=tmp_path / "fp32.pt2")
    spec = demo.data_free_source(built, "qimera:embedding=classifier,latent_size=32", echo=lambda *_: None)
    assert spec == f"gan:{tmp_path / 'datafree' / 'bn_cnn-qimera-classifier-latent_size32'}"
    assert made[0]["method"] == "qimera" and made[0]["options"].embedding == "classifier" and made[0]["options"].latent_size == 32
    assert demo.data_free_source(built, "gdfq", echo=lambda *_: None) == f"gan:{tmp_path / 'datafree' / 'bn_cnn-gdfq'}"
    assert made[1]["steps"] is None  # the method's default budget
    # the training budget is an option too, with its own cache entry
    assert demo.data_free_source(built, "clusterq:steps=3000,width=32", echo=lambda *_: None).endswith("bn_cnn-clusterq-steps3000-width32")
    assert made[2]["steps"] == 3000 and made[2]["options"].width == 32 and made[2]["seed"] == 0
    assert demo.data_free_source(built, "clusterq:seed=1", echo=lambda *_: None).endswith("bn_cnn-clusterq-seed1") and made[3]["seed"] == 1
    # Genie's statistics loss: the relative one unless the name says absolute, each its own cache entry
    assert demo.data_free_source(built, "genie", echo=lambda *_: None).endswith("bn_cnn-genie-relative-mixes3.npz")
    assert made[-1]["options"].bns == "relative"
    assert demo.data_free_source(built, "genie:bns=absolute", echo=lambda *_: None).endswith("bn_cnn-genie-absolute-mixes3.npz")
    assert made[-1]["options"].bns == "absolute"
    # grey (one channel repeated over the model's) reaches datafree, not the method's settings; 1 and true are one entry
    for name in ("genie:grey=1", "genie:grey=true"):
        assert demo.data_free_source(built, name, echo=lambda *_: None).endswith("bn_cnn-genie-relative-grey1-mixes3.npz")
        assert made[-1]["grey"] is True
    assert made[0].get("grey") is False
    with pytest.raises(EvoquantError, match="grey is 1 or 0"):
        demo.data_free_source(built, "genie:grey=2", echo=lambda *_: None)
    with pytest.raises(EvoquantError, match="bogus"):
        demo.data_free_source(built, "qimera:bogus=1", echo=lambda *_: None)
    # the demo gives a model of three channels grey data (the zoo's digits are grey in every channel), unless told otherwise
    assert demo.zoo_data_free_method("genie", (3, 32, 32)) == "genie:grey=1" and demo.zoo_data_free_method("genie", (1, 28, 28)) == "genie"
    assert demo.zoo_data_free_method("genie:seed=1", (3, 32, 32)) == "genie:seed=1,grey=1"
    assert demo.zoo_data_free_method("genie:grey=0", (3, 32, 32)) == "genie:grey=0"
