"""Resumable runs, islands and job arrays: a killed refine continues to the same bytes, islands reproduce
whatever runs them, and separate island jobs merge into the best model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import evoquant
from evoquant import EvoquantError
from test_cli import run_cli

SMALL = ["--selection-size", "32", "--verification-size", "32", "--selection-pool", "64", "--engine", "plain", "-q", "--stages", "ranges,reconstruct,evolve"]


@pytest.fixture()
def inputs(tiny_irs, tmp_path):
    for name in ("fp32.xml", "fp32.bin", "int8.xml", "int8.bin", "data.npz"):
        shutil.copy(Path(tiny_irs.fp32).parent / name, tmp_path / name)
    return tmp_path


def _refine_command(folder: Path, output: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "evoquant.cli", "refine", str(folder / "int8.xml"), "-r", str(folder / "fp32.xml"), "--data", str(folder / "data.npz"),
            "-o", str(folder / output), "--generations", "25", *SMALL, *extra]


def _generation(run_dir: Path) -> int:
    from evoquant.search.strategy import SearchState

    try:
        return SearchState.load(run_dir / "evolve.npz").generation
    except (OSError, ValueError, KeyError):
        return -1


def _pair(folder: Path, name: str) -> tuple[bytes, bytes]:
    return (folder / f"{name}.xml").read_bytes(), (folder / f"{name}.bin").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tiny_irs, tmp_path_factory) -> tuple[bytes, bytes]:
    """The refined IR of the uninterrupted run, which every resumed run must reproduce byte for byte."""
    folder = tmp_path_factory.mktemp("whole")
    for name in ("fp32.xml", "fp32.bin", "int8.xml", "int8.bin", "data.npz"):
        shutil.copy(Path(tiny_irs.fp32).parent / name, folder / name)
    subprocess.run(_refine_command(folder, "whole.xml"), check=True, capture_output=True, timeout=300)
    return _pair(folder, "whole")


@pytest.mark.parametrize("kill_at", ["ranged", "reconstructed", 3, 11, "finished"])
def test_a_refine_killed_and_resumed_writes_the_same_bytes(inputs, uninterrupted, kill_at):
    run_dir = inputs / "run"
    process = subprocess.Popen(_refine_command(inputs, "resumed.xml", "--run-dir", str(run_dir)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if kill_at == "ranged" and (run_dir / "ranges.npz").exists():
            break
        if kill_at == "reconstructed" and (run_dir / "reconstruct.npz").exists():
            break
        if isinstance(kill_at, int) and _generation(run_dir) >= kill_at:
            break
        time.sleep(0.05)
    if kill_at == "finished":
        process.wait(timeout=120)
    else:
        assert process.poll() is None, "the run ended before the kill point"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        assert not (inputs / "resumed.xml").exists()
    code, _, stderr = run_cli("refine", "--resume", str(run_dir), "-q")
    assert code == 0, stderr
    assert _pair(inputs, "resumed") == uninterrupted
    assert json.loads((run_dir / "run.json").read_text())["finished"]


def test_a_run_directory_of_another_run_is_refused(inputs):
    run_dir = inputs / "run"
    short = ["--stages", "reconstruct,evolve", "--generations", "1"]
    subprocess.run(_refine_command(inputs, "a.xml", "--run-dir", str(run_dir), *short), check=True, capture_output=True, timeout=300)
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    process = subprocess.run(_refine_command(inputs, "b.xml", "--run-dir", str(run_dir), *short, "--seed", "5"), capture_output=True, text=True, timeout=300)
    assert process.returncode == 2 and process.stderr.count("\n") == 1 and "belongs to another run (its config differ)" in process.stderr
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before and not (inputs / "b.xml").exists()
    code, _, stderr = run_cli("refine", "--resume", str(inputs))  # not a run directory
    assert code == 2 and "not an evoquant run directory" in stderr


def test_islands_reproduce_across_worker_counts(tiny_irs):
    config = evoquant.RefineConfig.from_yaml("fast").replace(
        selection_size=32, verification_size=32, selection_pool=64, engine="plain", progress=False, stages="evolve",
        search={"generations": 8, "islands": 3, "migration_interval": 3, "migrants": 1})
    one = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=config)
    two = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=config.replace(jobs=2))
    assert [h.best for h in one.history] == [h.best for h in two.history] and one.evaluations == two.evaluations
    assert one.evaluations > 2 * 8 * config.search.lambda_  # three populations ran


def test_islands_on_a_local_dask_cluster_reproduce(tiny_irs):
    pytest.importorskip("dask.distributed")
    from evoquant.fitness.parallel import cluster_backend

    config = evoquant.RefineConfig.from_yaml("fast").replace(
        selection_size=32, verification_size=32, selection_pool=64, engine="plain", progress=False, stages="evolve",
        search={"generations": 6, "islands": 2, "migration_interval": 3})
    local = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=config)
    with cluster_backend("dask"):
        distributed = evoquant.refine(tiny_irs.int8, reference=tiny_irs.fp32, config=config.replace(jobs=2, backend="dask"))
    assert [h.best for h in distributed.history] == [h.best for h in local.history]


def test_island_jobs_share_migrants_and_merge_picks_the_best(inputs):
    """The SLURM job-array example, run as two local processes with the array variables set, then merge."""
    script = Path(__file__).resolve().parent.parent / "docs" / "examples" / "refine-array.sbatch"
    shared = inputs / "shared"
    flags = ["--data", str(inputs / "data.npz"), "--generations", "25", "--migration-interval", "5", *SMALL]
    environment = {**os.environ, "SLURM_ARRAY_TASK_COUNT": "2", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    processes = [subprocess.Popen(["bash", str(script), str(inputs / "int8.xml"), str(inputs / "fp32.xml"), str(shared), *flags],
                                  env={**environment, "SLURM_ARRAY_TASK_ID": str(i)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for process in processes:
        assert process.wait(timeout=300) == 0, process.stderr.read()
    assert all((shared / "islands" / str(i) / "migrants.npz").is_file() and (shared / f"refined-{i}.xml").is_file() for i in range(2))
    code, stdout, stderr = run_cli("merge", str(shared), "-o", str(inputs / "best.xml"), "--report", str(inputs / "merge.json"))
    assert code == 0, stderr
    report = json.loads((inputs / "merge.json").read_text())
    rows = report["rows"]
    assert [row["run_dir"] for row in rows] == ["start"] + [str(shared / "islands" / str(i)) for i in range(2)]
    best = min(rows, key=lambda row: row["fitness"])
    assert best["fitness"] <= rows[0]["fitness"]  # never worse than the start
    assert report["chosen"] == best["run_dir"] and "<- written" in stdout and (inputs / "best.bin").is_file()


def test_island_flags_are_checked(inputs):
    for flags, words in ((["--island", "2/2", "--run-dir", "x"], "I must be in 0..N-1"), (["--island", "0/2"], "--run-dir"),
                         (["--island", "one"], "I/N"), (["--islands", "0"], "at least 1"), (["--migrants", "9"], "between 0 and mu")):
        code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), "--stages", "reconstruct,evolve", *flags, "-q")
        assert code == 2 and words in stderr and stderr.count("\n") == 1, stderr
    for flags in (["--islands", "2"], ["--mu", "3"]):  # settings of the evolve stage, which the default stages leave out
        code, _, stderr = run_cli("refine", str(inputs / "int8.xml"), "-r", str(inputs / "fp32.xml"), *flags, "-q")
        assert code == 2 and "evolve stage" in stderr and stderr.count("\n") == 1, stderr
    listing = sorted(os.listdir(inputs))
    with pytest.raises(EvoquantError, match="run directory"):
        evoquant.merge([inputs], output=inputs / "best.xml")
    assert sorted(os.listdir(inputs)) == listing


def test_the_dask_jobqueue_example_runs_on_a_local_cluster(inputs):
    pytest.importorskip("dask.distributed")
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "dask_jobqueue_islands.py"
    process = subprocess.run([sys.executable, str(example), str(inputs / "int8.xml"), str(inputs / "fp32.xml"), "--islands", "2", "--generations", "2",
                              "-o", str(inputs / "out.xml")], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert (inputs / "out.xml").is_file() and "verification" in process.stdout
