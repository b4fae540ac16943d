"""Every path a command writes: checked before any work (never an input, always writable), and written
atomically.

An IR is two files (.xml and .bin), so both are checked; paths are compared resolved (symlinks followed)
and case-insensitively, because on a case-insensitive file system ``-o INT8.xml`` *is* ``int8.xml``.

Writes. A single file (report, plot, .npz, checkpoint) is written under a hidden temporary name beside its
target and renamed into place: a reader sees the old file or the new one, never a partial one. An IR pair
is written under a staging folder beside the target, then committed with the target directory locked
(``flock``, so concurrent evoquant writers commit one after the other): the .bin first, then the .xml. The
.xml records the SHA-256 of the .bin it was written with (``<rt_info><evoquant_bin_sha256 .../>``), so a
reader that opens the pair between the two renames, or a pair mixed by any other means, is detected:
evoquant's own reader (:func:`evoquant.ir.runtime.read_ir`) checks the record and refuses a mismatch. A
plain OpenVINO reader does not check it; for it the only window is the instant between the two renames.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
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


# ------------------------------------------------------------------------------------------------
# atomic writes
# ------------------------------------------------------------------------------------------------

#: The rt_info key under which an IR written by evoquant records its .bin's SHA-256.
BIN_DIGEST_KEY = "evoquant_bin_sha256"


def _directory(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


@contextlib.contextmanager
def staged(path: PathLike, suffix: str | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block succeeds, removed
    when it fails. ``suffix`` (default: ``path``'s) matters to writers that pick a format by it."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=_directory(path), prefix=f".{path.name}.", suffix=suffix if suffix is not None else path.suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; outputs are ordinary shared files
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text(path: PathLike, text: str) -> None:
    """Write a text file atomically."""
    with staged(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def file_digest(path: PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_ir(output_xml: PathLike, write: Callable[[Path], None]) -> Path:
    """Write an IR pair atomically as a pair (see the module's docstring): ``write(staged_xml)`` writes the
    .xml and its .bin into a staging folder; they are marked with the .bin's digest and committed."""
    output_xml = Path(output_xml)
    if output_xml.suffix.lower() != ".xml":
        raise EvoquantError(f"the output must be an .xml path, got {output_xml}")
    directory = _directory(output_xml)
    if not directory.is_dir():
        raise EvoquantError(f"the output directory {directory} does not exist")
    staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".{output_xml.stem}.staging-"))
    try:
        staged_xml = staging / "model.xml"
        write(staged_xml)
        _mark(staged_xml, file_digest(staged_xml.with_suffix(".bin")))
        for file in (staged_xml, staged_xml.with_suffix(".bin")):
            os.chmod(file, 0o644)
        with _locked(directory):
            os.replace(staged_xml.with_suffix(".bin"), output_xml.with_suffix(".bin"))
            os.replace(staged_xml, output_xml)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_xml


def save_ir(model, output_xml: PathLike) -> Path:
    """``ov.save_model`` atomically; weights keep their element types (``compress_to_fp16`` off)."""
    import openvino as ov

    return write_ir(output_xml, lambda staged_xml: ov.save_model(model, str(staged_xml), compress_to_fp16=False))


def copy_ir(source_xml: PathLike, output_xml: PathLike) -> Path:
    """Copy an IR pair into place atomically."""
    source_xml = Path(source_xml)

    def copy(staged_xml: Path) -> None:
        shutil.copyfile(source_xml, staged_xml)
        shutil.copyfile(source_xml.with_suffix(".bin"), staged_xml.with_suffix(".bin"))

    return write_ir(output_xml, copy)


_MARK = re.compile(r'<%s value="[0-9a-f]*"\s*/>' % BIN_DIGEST_KEY)


def _mark(xml: Path, digest: str) -> None:
    """Record ``digest`` in the net-level rt_info of ``xml`` (replacing an earlier record)."""
    text = xml.read_text(encoding="utf-8")
    entry = f'<{BIN_DIGEST_KEY} value="{digest}" />'
    if _MARK.search(text):
        text = _MARK.sub(entry, text)
    else:
        end = text.rstrip().rfind("</net>")
        if end < 0:
            raise EvoquantError(f"{xml} is not an OpenVINO IR (no </net>)")
        body = text[:end].rstrip()
        if body.endswith("</rt_info>"):  # the net's own rt_info is its last child
            cut = len(body) - len("</rt_info>")
            text = f"{body[:cut]}\t{entry}\n\t</rt_info>\n</net>\n"
        else:
            text = f"{body}\n\t<rt_info>\n\t\t{entry}\n\t</rt_info>\n</net>\n"
    xml.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` (no lock file is left behind); a no-op where there is none."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock
