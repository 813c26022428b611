"""Files: atomic writes, and JSON / JSONL reading whose every error names the file and line."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional


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


