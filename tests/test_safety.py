"""No input file is ever modified, whatever paths are given; bad output paths fail before any work, in one
line; SIGTERM cleans up like Ctrl-C."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_cli import run_cli


def _digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir()) if path.is_file()}


@pytest.fixture()
def inputs(tiny_irs, tmp_path):
    """Private copies of the tiny IRs, so a test that fails cannot damage the shared ones."""
    for name in ("fp32.xml", "fp32.bin", "int8.xml", "int8.bin", "data.npz"):
        shutil.copy(Path(tiny_irs.fp32).parent / name, tmp_path / name)
    return tmp_path


REFINE = ["--selection-size", "32", "--verification-size", "32", "--selection-pool", "64", "--generations", "1", "-q"]


@pytest.mark.parametrize(
    "extra",
    [
        ["-o", "{d}/int8.XML"],  # case variant of the input: collides on a case-insensitive file system
        ["-o", "{d}/INT8.xml"],
        ["-o", "{d}/fp32.xml"],  # the reference
        ["-o", "{d}/link.xml"],  # a symlink to the input
        ["-o", "{d}/out.xml", "--report", "{d}/int8.xml"],
        ["-o", "{d}/out.xml", "--plot", "{d}/fp32.bin"],
        ["-o", "{d}/out.xml", "--report", "{d}/data.npz"],
        ["-o", "{d}/out.xml", "--report", "{d}/out.xml"],  # two outputs on one file
    ],
)
def test_refine_never_writes_over_an_input(inputs, extra):
    os.symlink(inputs / "int8.xml", inputs / "link.xml")
    before = _digest(inputs)
    args = [part.format(d=inputs) for part in extra]
    started = time.perf_counter()
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"), *args, *REFINE)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert time.perf_counter() - started < 30
    assert _digest(inputs) == before
    assert not (inputs / "out.xml").exists() and not (inputs / "out.bin").exists()


def test_quantize_never_writes_over_its_input(inputs):
    before = _digest(inputs)
    code, _, stderr = run_cli("quantize", str(inputs / "fp32.xml"), "-c", "fractal", "-o", str(inputs / "FP32.xml"), "--subset-size", "4")
    assert code == 2 and "would overwrite" in stderr
    assert _digest(inputs) == before


@pytest.mark.parametrize("target", ["dir", "proc"])
def test_unwritable_outputs_fail_before_the_search(inputs, target):
    if target == "dir":
        (inputs / "d.xml").mkdir()
        output = inputs / "d.xml"
    else:
        output = Path("/proc/evoquant.xml")
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"), "-o", str(output), *REFINE)
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert not (inputs / "d.bin").exists()


def test_sigterm_exits_143_and_leaves_no_temporary_files(inputs, tmp_path_factory):
    scratch = tmp_path_factory.mktemp("tmp")
    env = dict(os.environ, TMPDIR=str(scratch))
    process = subprocess.Popen(
        [sys.executable, "-m", "evoquant.cli", "refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"),
         "-o", str(inputs / "out.xml"), "--stages", "evolve", "--generations", "1000", "--engine", "plain", "--selection-size", "32", "--verification-size", "32",
         "--selection-pool", "64", "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(scratch.glob("evoquant-*")):  # wait until the run holds its work directory
        time.sleep(0.2)
    time.sleep(1.0)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "terminated"
    assert not any(scratch.glob("evoquant-*"))
    assert not (inputs / "out.xml").exists()


@pytest.mark.parametrize(
    "text",
    [
        "selection_size: lots",
        "value_range: 5",
        "value_range: [0, 1, 2]",
        "search:\n  mu: 2.5",
        "search: [1, 2]",
        "search:\n  offspring_groups: -2",
        "search:\n  patience: -1",
        "search:\n  max_evaluations: 0",
        "reconstruct:\n  damping: none",
        "stages: [reconstruct, polish]",
    ],
)
def test_bad_config_values_are_one_line_errors(tmp_path, text):
    from evoquant import EvoquantError, RefineConfig

    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(EvoquantError) as error:
        RefineConfig.from_yaml(path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--max-evaluations", "0"], ["--time-limit", "0"]])
def test_bad_budget_flags_are_refused_before_work(inputs, flags):
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), *flags, "-q")
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
