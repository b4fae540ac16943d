"""The command line as a user meets it: help, one-line errors with a non-zero exit, no partial outputs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from evoquant.cli import main


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run ``evoquant ARGS`` in a fresh interpreter, as a user would."""
    process = subprocess.run([sys.executable, "-m", "evoquant.cli", *args], capture_output=True, text=True, timeout=300)
    return process.returncode, process.stdout, process.stderr


def test_help_lists_commands_and_examples():
    code, out, _ = run_cli("--help")
    assert code == 0 and "refine" in out and "inspect" in out and "demo" in out
    code, out, _ = run_cli("refine", "--help")
    assert code == 0 and "examples:" in out and "--reference" in out and "module:function" in out.lower()


def test_inspect_prints_a_table_and_json(tiny_irs, capsys):
    assert main(["inspect", str(tiny_irs.int8)]) == 0
    table = capsys.readouterr().out
    assert "conv1" in table and "[-63, 63]" in table and "3 quantized tensors" in table
    assert main(["inspect", str(tiny_irs.int8), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["consumer"] for row in report["weights"]] == ["conv1", "depthwise", "fc"]
    assert report["unmatched"] == []


def test_refine_cli_writes_output_and_report(tiny_irs, tmp_path):
    out, report = tmp_path / "refined.xml", tmp_path / "report.json"
    code, stdout, stderr = run_cli(
        "refine", str(tiny_irs.int8), "--reference", str(tiny_irs.fp32), "-o", str(out), "--report", str(report),
        "--preset", "fast", "--stages", "reconstruct,evolve", "--generations", "2", "--selection-size", "16", "--verification-size", "16", "--quiet",
    )
    assert code == 0, stderr
    assert "KL(FP32||INT8)" in stdout and out.exists() and out.with_suffix(".bin").exists()
    data = json.loads(report.read_text())
    assert data["evaluations"] >= 1 and data["objective"] == "kl"
    assert 1 <= data["selection_images"] <= 16 and data["selection_effective_size"] is not None  # the fast preset's pool
    code, stdout, stderr = run_cli(
        "refine", str(tiny_irs.int8), "--reference", str(tiny_irs.fp32), "--report", str(report), "--preset", "fast", "--stages", "reconstruct,evolve", "--generations", "1",
        "--selection-size", "16", "--verification-size", "16", "--selection-pool", "0", "--quiet",
    )
    assert code == 0, stderr
    data = json.loads(report.read_text())
    assert data["selection_images"] == 16 and data["selection_effective_size"] is None


def bad_inputs(tiny_irs, tmp_path):
    """(description, extra args, expected message) for every bad input the issue lists."""
    (tmp_path / "malformed.xml").write_text("<net><layers>")
    (tmp_path / "nobin.xml").write_bytes(tiny_irs.int8.read_bytes())
    (tmp_path / "short.xml").write_bytes(tiny_irs.int8.read_bytes())
    weights = tiny_irs.int8.with_suffix(".bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(weights[: len(weights) // 3])
    np.savez(tmp_path / "wrong_shape.npz", x=np.zeros((600, 1, 28, 28), np.float32))
    np.savez(tmp_path / "wrong_dtype.npz", x=np.array([["a"] * 8] * 600))
    from tests.conftest import tiny_fp32_model
    import openvino as ov
    import openvino.opset13 as opset

    other = opset.parameter([-1, 3, 8, 8], np.float32, name="input")
    mismatched = ov.Model([opset.reshape(other, opset.constant(np.array([-1, 192], dtype=np.int64)), False)], [other])
    ov.save_model(mismatched, tmp_path / "mismatch.xml")
    model, ref = str(tiny_irs.int8), ["--reference", str(tiny_irs.fp32)]
    return [
        ("missing model", [str(tmp_path / "absent.xml"), *ref], "no such model file"),
        ("malformed xml", [str(tmp_path / "malformed.xml"), *ref], "malformed XML"),
        ("missing bin", [str(tmp_path / "nobin.xml"), *ref], "missing"),
        ("truncated bin", [str(tmp_path / "short.xml"), *ref], "truncated"),
        ("no quantized weights", [str(tiny_irs.fp32), *ref], "no quantized weights"),
        ("reference mismatch", [model, "--reference", str(tmp_path / "mismatch.xml")], "do not match"),
        ("wrong data shape", [model, *ref, "--data", str(tmp_path / "wrong_shape.npz")], "28x28"),
        ("wrong data dtype", [model, *ref, "--data", str(tmp_path / "wrong_dtype.npz")], "dtype"),
        ("unknown data source", [model, *ref, "--data", "imagenet"], "unknown"),
        ("unknown objective", [model, *ref, "--fitness", "tests.hooks.nowhere:f"], "cannot import"),
        ("hook returns nan", [model, *ref, "--fitness", "tests.hooks.fitness_hooks:returns_nan"], "finite"),
        ("bad input range", [model, *ref, "--input-range", "1"], "LOW,HIGH"),
        ("unknown preset", [model, *ref, "--preset", "turbo"], "unknown preset"),
        ("bad importance", [model, *ref, "--importance", "1.5"], "importance share"),
    ]


def test_every_bad_input_is_one_line_and_writes_nothing(tiny_irs, tmp_path, capsys):
    for description, args, message in bad_inputs(tiny_irs, tmp_path):
        out = tmp_path / "never.xml"
        code = main(["refine", *args, "-o", str(out), "--quiet"])
        captured = capsys.readouterr()
        assert code == 2, description
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{description}: {captured.err!r}"
        assert message.lower() in lines[0].lower(), f"{description}: {lines[0]}"
        assert "Traceback" not in captured.err
        assert not out.exists() and not out.with_suffix(".bin").exists(), description


def test_unknown_objective_is_rejected_by_the_parser():
    code, _, stderr = run_cli("refine", "model.xml", "--objective", "entropy")
    assert code == 2 and "invalid choice" in stderr and "Traceback" not in stderr
