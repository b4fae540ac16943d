"""A run directory (``refine --run-dir DIR``): what a refine needs to continue after it was killed.

Layout (every file written atomically, see :mod:`evoquant.paths`)::

    DIR/run.json           what the run is: its arguments and a fingerprint of its inputs (model, reference,
                           data, config, objective); written first
    DIR/reconstruct.npz    the reconstruct stage's states and report, once the stage has finished
    DIR/evolve.npz         the search's state after its last finished generation (one population)
    DIR/islands.json       with islands: which epoch's island states are current ...
    DIR/evolve-island-I-eE.npz   ... and the states themselves (older epochs are removed)
    DIR/result.xml/.bin    the refined IR as written to -o, once the run has finished
    DIR/report.json        its report

``refine --resume DIR`` (or ``--run-dir DIR`` again) skips finished stages, continues the search from its
last generation, and ends with the same IR, byte for byte, as an uninterrupted run with the same seed: the
stages are deterministic and the search's state holds its random generator. A run directory whose
fingerprint differs from the run asked for (another model, reference, data, config or objective) is
refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evoquant.errors import EvoquantError
from evoquant.paths import copy_ir, file_digest, staged, write_text

RUN_FILE = "run.json"
RUN_FORMAT = 1
#: Settings that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = ("jobs", "backend", "progress")


def data_fingerprint(data) -> str:
    """What identifies fitness data: a file's digest, a folder's listing (names and sizes), a generator
    directory's weights, an array's bytes, or a built-in source's spec."""
    from evoquant.data import Batch, DataSource, spec_path

    if data is None:
        return "none"
    if isinstance(data, np.ndarray):
        return "array:" + hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()
    if isinstance(data, Batch):
        labels = b"" if data.labels is None else np.ascontiguousarray(data.labels).tobytes()
        return "batch:" + hashlib.sha256(np.ascontiguousarray(data.images).tobytes() + labels).hexdigest()
    if isinstance(data, DataSource):
        data = data.spec
    prefix, location = spec_path(data)
    path = Path(location)
    if path.is_file():
        return f"file:{file_digest(path)}"
    if path.is_dir():
        digest = hashlib.sha256()
        for root, directories, files in sorted(os.walk(path)):
            directories.sort()
            for name in sorted(files):
                file = Path(root) / name
                digest.update(f"{file.relative_to(path)}:{file.stat().st_size}\n".encode())
                if prefix and file.suffix in (".bin", ".json"):
                    digest.update(file_digest(file).encode())
        return f"folder:{digest.hexdigest()}"
    return f"spec:{data}"


def ir_fingerprint(xml) -> str | None:
    if xml is None:
        return None
    xml = Path(xml)
    return file_digest(xml) + ":" + file_digest(xml.with_suffix(".bin"))


@dataclass
class RunDir:
    """An open run directory: its record, and the stage results and search states saved in it."""

    path: Path
    record: dict

    @classmethod
    def open(cls, path, arguments: dict, fingerprint: dict) -> "RunDir":
        """Create ``path`` for a new run, or check that it belongs to this run (same fingerprint)."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise EvoquantError(f"--run-dir {path} exists and is not a directory")
        record_file = path / RUN_FILE
        if record_file.is_file():
            record = read_record(path)
            theirs = record.get("fingerprint", {})
            differs = [key for key in sorted(set(theirs) | set(fingerprint)) if theirs.get(key) != fingerprint.get(key)]
            if differs:
                raise EvoquantError(f"the run directory {path} belongs to another run (its {', '.join(differs)} differ): give a new --run-dir, "
                                    "or the same inputs and settings")
            return cls(path, record)
        if path.is_dir() and any(path.iterdir()) and not (path / "islands").is_dir():
            raise EvoquantError(f"--run-dir {path} is not empty and holds no evoquant run ({RUN_FILE} is missing)")
        path.mkdir(parents=True, exist_ok=True)
        record = {"format": RUN_FORMAT, "arguments": arguments, "fingerprint": fingerprint, "finished": False}
        write_text(record_file, json.dumps(record, indent=2) + "\n")
        return cls(path, record)

    # -- stages --------------------------------------------------------------------------------
    def load_states(self, stage: str) -> tuple[dict[int, np.ndarray], dict, float, dict[int, np.ndarray]] | None:
        """A finished stage's states, report details, seconds and per-tensor residuals (None if it has not
        finished)."""
        file = self.path / f"{stage}.npz"
        if not file.is_file():
            return None
        with np.load(file, allow_pickle=False) as archive:
            meta = json.loads(str(archive["meta"]))
            states = {int(key[1:]): archive[key] for key in archive.files if key.startswith("t")}
            residuals = {int(key[1:]): archive[key] for key in archive.files if key.startswith("r")}
        return states, meta["details"], meta["seconds"], residuals

    def save_states(self, stage: str, states: dict[int, np.ndarray], details: dict, seconds: float, residuals: dict[int, np.ndarray] | None = None) -> None:
        arrays = {f"t{tensor}": np.asarray(value) for tensor, value in states.items()}
        arrays.update({f"r{tensor}": np.asarray(value) for tensor, value in (residuals or {}).items()})
        arrays["meta"] = np.array(json.dumps({"details": details, "seconds": seconds}, default=_plain))
        with staged(self.path / f"{stage}.npz") as temporary:
            np.savez(temporary, **arrays)

    # -- the search ----------------------------------------------------------------------------
    def load_search(self):
        from evoquant.search.strategy import SearchState

        file = self.path / "evolve.npz"
        return SearchState.load(file) if file.is_file() else None

    def save_search(self, state) -> None:
        state.save(self.path / "evolve.npz")

    def load_islands(self):
        from evoquant.search.strategy import SearchState

        pointer = self.path / "islands.json"
        if not pointer.is_file():
            return None
        files = json.loads(pointer.read_text())["files"]
        return [SearchState.load(self.path / name) for name in files]

    def save_islands(self, states) -> None:
        """All islands' states as of one epoch: the files first, then the pointer naming them (atomic), then
        the previous epoch's files are removed. A kill at any point leaves one complete epoch."""
        epoch = max(state.generation for state in states)
        names = [f"evolve-island-{i}-e{epoch}.npz" for i in range(len(states))]
        for state, name in zip(states, names):
            state.save(self.path / name)
        write_text(self.path / "islands.json", json.dumps({"epoch": epoch, "files": names}) + "\n")
        for old in self.path.glob("evolve-island-*.npz"):
            if old.name not in names:
                old.unlink(missing_ok=True)

    # -- the result ----------------------------------------------------------------------------
    def save_result(self, final_xml: Path, report: dict) -> None:
        from evoquant.report import write_json

        copy_ir(final_xml, self.path / "result.xml")
        write_json(report, self.path / "report.json")
        self.record["finished"] = True
        write_text(self.path / RUN_FILE, json.dumps(self.record, indent=2) + "\n")


def read_record(path) -> dict:
    """The record of a run directory, or a one-line error."""
    record_file = Path(path) / RUN_FILE
    if not record_file.is_file():
        raise EvoquantError(f"{path} is not an evoquant run directory (no {RUN_FILE})")
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError) as error:
        raise EvoquantError(f"{record_file} is damaged ({error})") from None
    if not isinstance(record, dict) or record.get("format") != RUN_FORMAT:
        raise EvoquantError(f"{record_file} is not a run record this evoquant can read (format {record.get('format') if isinstance(record, dict) else '?'})")
    return record


def _plain(value):
    """JSON for numpy scalars and arrays in stage details."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(value)
    raise TypeError(f"cannot record {type(value).__name__}")
