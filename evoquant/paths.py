"""Every path a command will write, checked before any work: never an input, always writable.

An IR is two files (.xml and .bin), so both are checked; paths are compared resolved (symlinks followed)
and case-insensitively, because on a case-insensitive file system ``-o INT8.xml`` *is* ``int8.xml``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from evoquant.errors import EvoquantError

PathLike = str | os.PathLike


def files_of(path: PathLike) -> list[Path]:
    """The files behind a path: an IR's .xml and .bin, or the path itself."""
    path = Path(path)
    return [path, path.with_suffix(".bin")] if path.suffix.lower() == ".xml" else [path]


def same_file(a: Path, b: Path) -> bool:
    """Whether writing ``a`` could replace ``b``: the same resolved path, the same file (hard links), or
    the same path but for letter case."""
    first, second = Path(os.path.realpath(a)), Path(os.path.realpath(b))
    if first == second or str(first).casefold() == str(second).casefold():
        return True
    try:
        return first.exists() and second.exists() and os.path.samefile(first, second)
    except OSError:
        return False


def check_outputs(outputs: Mapping[str, PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """Refuse, before any work, an output that is (or could collide with) an input or another output, a
    directory in a file's place, a missing directory, or one that cannot be written (a probe file is
    created and removed). ``outputs`` maps the option that names each path (``-o``, ``--report``) to it."""
    input_files = [file for path in inputs if path is not None for file in files_of(path)]
    seen: list[tuple[str, Path]] = []
    for option, output in outputs.items():
        if output is None:
            continue
        for file in files_of(output):
            for source in input_files:
                if same_file(file, source):
                    raise EvoquantError(f"{option} {output} would overwrite the input {source}; choose another path")
            for other_option, other in seen:
                if same_file(file, other):
                    raise EvoquantError(f"{option} {output} and {other_option} would write the same file {file}")
            if file.is_dir():
                raise EvoquantError(f"{option} {output}: {file} is a directory")
            seen.append((option, file))
        _probe(option, Path(output))


def _probe(option: str, output: Path) -> None:
    directory = output.parent if str(output.parent) else Path(".")
    if not directory.is_dir():
        raise EvoquantError(f"{option} {output}: the directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".evoquant-probe-"):
            pass
    except OSError as error:
        raise EvoquantError(f"{option} {output}: cannot write in {directory} ({error.strerror or error})") from None
