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

import numpy as np
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


REFINE = ["--selection-size", "32", "--verification-size", "32", "--selection-pool", "64", "-q"]


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


def test_an_unknown_reconstruct_solver_is_refused_before_work(inputs, tmp_path):
    config = tmp_path / "solver.yaml"
    config.write_text("reconstruct:\n  solver: adaround\n")  # a benchmark baseline: not registered in the CLI
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--config", str(config), "-o", str(tmp_path / "o.xml"), "-q")
    _refuses(code, stderr, "unknown solver 'adaround'; known: output")
    assert not (tmp_path / "o.xml").exists()


@pytest.mark.parametrize("flags", [["--seed", "-1"], ["--max-evaluations", "0"], ["--time-limit", "0"]])
def test_bad_budget_flags_are_refused_before_work(inputs, flags):
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), *flags, "-q")
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr


def test_a_budget_for_a_stage_that_does_not_run_is_refused(inputs):
    """The default stages search nothing: --generations would be ignored, so it is an error that says which stage to add."""
    code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"), "--generations", "5", *REFINE)
    _refuses(code, stderr, "--generations budgets a search stage (compose or evolve), and neither runs (ranges,reconstruct): add one, e.g. --stages ranges,reconstruct,compose")


def _refuses(code: int, stderr: str, words: str) -> None:
    """Exit 2, one line naming what is wrong, no traceback."""
    assert code == 2 and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert words in stderr, stderr


def _refine(inputs, *flags):
    return run_cli("refine", str(inputs / "int8.xml"), *flags, "-o", str(inputs / "out.xml"), *REFINE)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["-r", "{d}/fp32.xml", "--data", "{d}/data.npz", "--fitness", "tests.hooks.fitness_hooks:raises"], "raised KeyError"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/data.npz", "--fitness", "tests.hooks.fitness_hooks:exits"], "called sys.exit(0)"),
        (["-r", "{d}/fp32.xml", "--objective", "ce", "--data", "fractal:8"], "are not the model's classes"),
        (["-r", "{d}/fp32.xml", "--objective", "ce", "--data", "{d}/data.npz"], "needs labelled data"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/labelled.npz", "--objective", "ce"], "labels 0..19 but the model has 10 classes"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/data.npz", "--heldout", "{d}/labelled.npz"], "labels 0..19 but the model has 10 classes"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/data.npz", "--heldout", "{d}/random.npz"], "is not a valid .npz archive"),
        (["-r", "{d}/int8.xml", "--data", "{d}/data.npz"], "is itself quantized"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/data.npz", "--jobs", "1000"], "--jobs 1000"),
        (["-r", "{d}", "--data", "{d}/data.npz"], "is a directory"),
        (["-r", "{d}/fp32.xml", "--data", "{d}/random.npz"], "is not a valid .npz archive"),
    ],
)
def test_bad_runs_are_refused_in_one_line_before_any_search(inputs, flags, words):
    rng = np.random.default_rng(0)
    np.savez(inputs / "labelled.npz", x=rng.random((200, 3, 8, 8), dtype=np.float32), y=np.arange(200) % 20)
    (inputs / "random.npz").write_bytes(rng.bytes(4096))
    before, listing = _digest(inputs), sorted(path.name for path in inputs.iterdir())
    started = time.perf_counter()
    code, _, stderr = _refine(inputs, *[flag.format(d=inputs) for flag in flags])
    _refuses(code, stderr, words)
    assert time.perf_counter() - started < 30  # a fresh interpreter importing OpenVINO; the check itself is instant
    assert _digest(inputs) == before and sorted(path.name for path in inputs.iterdir()) == listing


@pytest.mark.parametrize("part", ["weights", "all"])
def test_a_bin_of_garbage_is_refused(inputs, part):
    """Random bytes in the integer weights (OpenVINO reads it; the model has nothing to do with the reference),
    or in the whole .bin (OpenVINO cannot read it)."""
    from xml.etree import ElementTree

    data = bytearray((inputs / "int8.bin").read_bytes())
    rng = np.random.default_rng(1)
    if part == "all":
        data[:] = rng.bytes(len(data))
    for layer in ElementTree.parse(inputs / "int8.xml").getroot().iter("layer"):
        element = layer.find("data")
        if part == "weights" and layer.get("type") == "Const" and element.get("element_type") == "i8":
            offset, size = int(element.get("offset")), int(element.get("size"))
            data[offset : offset + size] = rng.bytes(size)
    (inputs / "int8.bin").write_bytes(bytes(data))
    code, _, stderr = _refine(inputs, "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"))
    _refuses(code, stderr, ".bin")
    assert not (inputs / "out.xml").exists()


def test_synth_refuses_a_draw_larger_than_memory(tmp_path):
    code, _, stderr = run_cli("synth", "-s", "noise", "-n", "10000000000", "--shape", "3,32,32", "-o", str(tmp_path / "x.npz"))
    _refuses(code, stderr, "GiB")
    assert not list(tmp_path.iterdir())


def test_an_ir_pair_mixed_from_two_writes_is_detected(tiny_irs, tmp_path):
    """Every IR evoquant writes records its .bin's digest; evoquant's reader refuses a pair that does not match."""
    import openvino as ov

    from evoquant import EvoquantError
    from evoquant.ir.runtime import read_ir
    from evoquant.paths import copy_ir, save_ir

    copy_ir(tiny_irs.int8, tmp_path / "a.xml")
    save_ir(ov.Core().read_model(tiny_irs.fp32), tmp_path / "b.xml")
    read_ir(tmp_path / "a.xml")
    shutil.copy(tmp_path / "b.bin", tmp_path / "a.bin")  # what a reader between the two renames of a write would see
    with pytest.raises(EvoquantError, match="does not belong"):
        read_ir(tmp_path / "a.xml")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.bin", "a.xml", "b.bin", "b.xml"]  # no staging left


def test_concurrent_writers_never_leave_a_mixed_pair(tiny_irs, tmp_path):
    import threading

    import openvino as ov

    from evoquant.ir.runtime import read_ir
    from evoquant.paths import save_ir

    models = [ov.Core().read_model(tiny_irs.int8), ov.Core().read_model(tiny_irs.fp32)]

    def write(model):
        for _ in range(10):
            save_ir(model, tmp_path / "out.xml")

    threads = [threading.Thread(target=write, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read_ir(tmp_path / "out.xml")  # the record matches: the last commit wrote both files
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.bin", "out.xml"]


def test_a_run_without_output_says_nothing_was_written(inputs):
    code, stdout, _ = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--data", str(inputs / "data.npz"), "--stages", "reconstruct", *REFINE)
    assert code == 0 and "nothing written (no -o given)" in stdout
