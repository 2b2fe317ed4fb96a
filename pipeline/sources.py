"""Where videos come from: local files, directories and globs, lists of URIs, and any pyarrow filesystem URI
(``s3://``, ``gs://``, ``hdfs://``, ``file://``). Remote files are copied to a local temporary file to decode."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SourceError(ValueError):
    """An input that cannot be listed; the message says which and why."""


def is_uri(path: str) -> bool:
    return bool(_SCHEME.match(path))


def _filesystem(uri: str):
    try:
        return pafs.FileSystem.from_uri(uri)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise SourceError(f"cannot open {uri}: {str(e).splitlines()[0]}") from None


def expand(pattern: str, extensions: tuple[str, ...]) -> list[str]:
    """Video files named by ``pattern``: a file (taken whatever its suffix), a directory (searched recursively
    for ``extensions``), a local glob, or a filesystem URI of a file or directory."""
    suffixes = tuple(e.lower() for e in extensions)
    if is_uri(pattern):
        fs, path = _filesystem(pattern)
        scheme = pattern.split("://", 1)[0]
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [pattern]
        if info.type != pafs.FileType.Directory:
            return []
        found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(f"{scheme}://{f.path}" for f in found
                      if f.type == pafs.FileType.File and f.path.lower().endswith(suffixes))
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):
        return [os.path.abspath(pattern)]
    if os.path.isdir(pattern):
        pattern = os.path.join(pattern, "**", "*")
    return [os.path.abspath(p) for p in glob.glob(pattern, recursive=True)
            if os.path.isfile(p) and p.lower().endswith(suffixes)]


def read_uri_list(path: str) -> list[str]:
    """URIs from a list file: ``.jsonl`` (a ``uri`` per line), ``.csv`` (a ``uri`` column) or plain text (one per
    line, ``#`` comments). Relative paths are taken from the list's folder. SourceError names the line at fault."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    if path.endswith(".jsonl"):
        uris = [_jsonl_uri(path, n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
    elif path.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
        if rows and "uri" not in rows[0]:
            raise SourceError(f"{path}:1: needs a 'uri' column, got {', '.join(map(str, rows[0]))}")
        uris = [row["uri"] or "" for row in rows]
    else:
        uris = [line.split("#", 1)[0].strip() for line in text.splitlines()]
    base = Path(path).parent
    return [u if is_uri(u) or os.path.isabs(u) else str((base / u).resolve()) for u in uris if u]


def _jsonl_uri(path: str, line_number: int, line: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(f"{path}:{line_number}: not valid JSON: {e.msg}") from None
    if not isinstance(row, dict) or not isinstance(row.get("uri"), str):
        raise SourceError(f"{path}:{line_number}: each line needs a 'uri' string")
    return row["uri"]


def stat(uri: str) -> tuple[int, int]:
    """(size in bytes, modification time in ns) of a local path or filesystem URI."""
    if not is_uri(uri):
        st = os.stat(uri)
        return st.st_size, st.st_mtime_ns
    fs, path = _filesystem(uri)
    info = fs.get_file_info(path)
    return int(info.size or 0), int(info.mtime_ns or 0)


@contextmanager
def local_path(uri: str) -> Iterator[str]:
    """A local path for ``uri``: the file itself, or a temporary copy of a remote one (removed afterwards)."""
    if not is_uri(uri) or uri.startswith("file://"):
        yield uri[len("file://"):] if uri.startswith("file://") else uri
        return
    fs, path = _filesystem(uri)
    fd, tmp = tempfile.mkstemp(suffix=Path(path).suffix, prefix="reeltag-")
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, length=8 << 20)
        yield tmp
    finally:
        os.unlink(tmp)
