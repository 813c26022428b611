"""Files: atomic writes, one-line write errors, and JSON / JSONL reading whose every error names
the file and line."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

from safetensors import SafetensorError


def fsync_path(path) -> None:
    """Flush a file's (or a directory's) contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path, write: Callable[[str], None], mode: Optional[int] = None) -> None:
    """Call ``write(tmp)`` on a temporary file beside `path`, then rename it over `path`.

    A reader never sees a half-written file: it sees the old one or the new one. The file is
    flushed to disk before the rename, and gets `mode`, by default `file_mode()` (temporary
    files are created owner-only; every file minift writes gets the same mode as a plain one).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        fsync_path(tmp)
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def stale_temp_files(folder, name: str) -> list[Path]:
    """Temporary files that `atomic_write` left beside ``folder/name`` when the process was killed
    before it could remove them (``.<name>.<random>.tmp``)."""
    folder = Path(folder)
    return sorted(folder.glob(f".{name}.*.tmp")) if folder.is_dir() else []


# ---- write errors --------------------------------------------------------------------------
_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class WriteError(OSError):
    """A failed write as one line: what was written where, why, and what is intact. Handlers
    that see one pass it on unchanged rather than wrapping it again."""


def os_error_of(err: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write; None when `err` is no I/O error. safetensors reports
    its I/O errors as a SafetensorError ('Error while serializing: I/O error: No space left on
    device (os error 28)'), which no ``except OSError`` sees."""
    if isinstance(err, OSError):
        return err
    match = _OS_ERROR.search(str(err)) if isinstance(err, SafetensorError) else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def is_disk_full(err: BaseException) -> bool:
    cause = os_error_of(err)
    return cause is not None and cause.errno in _NO_SPACE


def free_bytes(path) -> Optional[int]:
    """Bytes free to this user on the file system of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for existing in (path, *path.parents):
        if existing.exists():
            try:
                return shutil.disk_usage(existing).free
            except OSError:
                return None
    return None


def write_error(err: BaseException, what: str, folder, needed: Optional[int] = None,
                then: str = "") -> Optional[WriteError]:
    """`err` as one line, ``<what>: <reason>; <then>``; None when it is no I/O error.

    On a full disk the reason carries the bytes the write needed and those free in `folder`
    (measured now: after the caller removed what it had partly written).
    """
    if isinstance(err, WriteError):
        return err
    cause = os_error_of(err)
    if cause is None:
        return None
    reason = cause.strerror or str(cause)
    if cause.errno in _NO_SPACE:
        free = free_bytes(folder)
        sizes = [f"it needs about {needed:,} bytes" if needed is not None else None,
                 f"{free:,} bytes are free in {folder}" if free is not None else None]
        reason += f" ({'; '.join(s for s in sizes if s)})" if any(sizes) else ""
    return WriteError(cause.errno, f"{what}: {reason}" + (f"; {then}" if then else ""))


@contextlib.contextmanager
def reporting_write_errors(what: str, folder, needed: Optional[int] = None,
                           then: Union[str, Callable[[BaseException], str]] = "",
                           undo: Optional[Callable[[], None]] = None):
    """Turn an I/O error (an OSError, or safetensors' SafetensorError) inside the block into one
    `write_error` line; `undo` runs first (remove a partial file to give the space back), and
    `then` may be a function of the error (what to do depends on whether the disk was full)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        if os_error_of(err) is None:
            raise
        if undo is not None:
            undo()
        if isinstance(err, WriteError):  # already one line, from a write inside this one
            raise
        raise write_error(err, what, folder, needed, then(err) if callable(then) else then) from err


def write_json(path, obj, *, indent: Optional[int] = 2, sort_keys: bool = False,
               ensure_ascii: bool = True, atomic: bool = True) -> None:
    """`obj` as UTF-8 JSON with a final newline; atomically unless `atomic` is False (a file
    inside a temporary directory that is renamed as a whole needs no second rename)."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii) + "\n"
    if atomic:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def decode_utf8(data: bytes, path, first_line: int = 1) -> str:
    """`data` as text; a byte that is not UTF-8 is a ValueError naming `path`:line and column.

    `first_line` is the line number of the first byte (for a line of a larger file).
    """
    try:
        return data.decode("utf-8-sig" if first_line == 1 else "utf-8")  # tolerate a BOM
    except UnicodeDecodeError as err:
        line = first_line + data.count(b"\n", 0, err.start)
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise ValueError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start:err.start + 1]!r} "
                         f"at column {column}); save the file as UTF-8") from None


def parse_json(text: str, path, first_line: int = 1) -> Any:
    """JSON text; a syntax error is a ValueError naming `path`:line (and the column)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{first_line + err.lineno - 1}: invalid JSON ({err.msg} at "
                         f"column {err.colno})") from None


def read_json(path, *, expect: Optional[type] = None) -> Any:
    """The JSON document in `path`; every failure is a ValueError naming the file (and line).

    Args:
        expect: when given (e.g. dict), the top-level value must be of this type.
    """
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: missing") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot read ({err.strerror})") from None
    value = parse_json(decode_utf8(data, path), path)
    if expect is not None and not isinstance(value, expect):
        raise ValueError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}, "
                         f"got {type(value).__name__}")
    return value


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; errors name file:line.

    Bytes are decoded a line at a time, so a byte that is not UTF-8 is reported with its line
    rather than as a bare codec error from deep inside the file iterator.
    """
    rows = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(raw, path, first_line=lineno)
            if not line.strip():
                continue
            row = parse_json(line.rstrip("\r\n"), path, first_line=lineno)
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    return rows


