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
