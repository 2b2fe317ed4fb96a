"""Where videos come from: local files, directories and globs, lists of URIs, and any pyarrow filesystem URI
(``s3://``, ``gs://``, ``hdfs://``, ``file://``). Remote files are copied to a local temporary file to decode."""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import stat as stat_module
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

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


def expand(pattern: str, extensions: tuple[str, ...], skipped: Counter | None = None) -> list[str]:
    """Video files named by ``pattern``: a file (taken whatever its suffix), a directory (searched recursively
    for ``extensions``, each real file once, symlink loops included), a local glob, or a filesystem URI of a file
    or directory. ``skipped`` counts, by suffix, the files of a directory or glob left out for theirs."""
    suffixes = tuple(e.lower() for e in extensions)
    skipped = Counter() if skipped is None else skipped
    if is_uri(pattern):
        fs, path = _filesystem(pattern)
        scheme = pattern.split("://", 1)[0]
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [pattern]
        if info.type != pafs.FileType.Directory:
            return []
        found = [f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                 if f.type == pafs.FileType.File]
        return sorted(f"{scheme}://{p}" for p in _videos(found, suffixes, skipped))
    pattern = os.path.expanduser(pattern)
    if os.path.isfile(pattern):
        return [os.path.abspath(pattern)]
    if os.path.isdir(pattern):
        return _videos(_walk(pattern), suffixes, skipped)
    return _videos([os.path.abspath(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)], suffixes,
                   skipped)


def _videos(paths: Iterable[str], suffixes: tuple[str, ...], skipped: Counter) -> list[str]:
    """The paths with a video suffix; the others are counted in ``skipped`` by suffix (hidden files too)."""
    videos = []
    for path in paths:
        name = os.path.basename(path)
        if name.lower().endswith(suffixes) and not name.startswith("."):
            videos.append(path)
        else:
            skipped["hidden" if name.startswith(".") else (os.path.splitext(name)[1].lower() or "no suffix")] += 1
    return videos


def _walk(root: str) -> list[str]:
    """Every regular file under ``root`` once, by its first path: symlinked directories are followed, but a
    directory already seen (a loop, or two links to one place) is not entered again, nor a file seen again."""
    seen_dirs, seen_files, files = set(), set(), []
    for directory, subdirs, names in os.walk(os.path.abspath(root), followlinks=True):
        st = os.stat(directory)
        if (st.st_dev, st.st_ino) in seen_dirs:
            subdirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        subdirs.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # a dangling link
            if stat_module.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                files.append(path)
    return files


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
