"""Labelled clip manifests (``.jsonl`` or ``.csv``): ``uri, start_s, end_s`` and a ``caption`` or a ``label``."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


class ManifestError(ValueError):
    """A manifest problem; the message names the file and line."""


@dataclass(frozen=True)
class LabelledClip:
    uri: str  # absolute path (relative ones are taken from the manifest's folder)
    start_s: float  # clip start, seconds
    end_s: float | None  # clip end, seconds; None: the end of the video
    text: str  # the caption, or the label
    is_label: bool  # True when ``text`` came from a ``label`` column


def read_manifest(path: str | Path) -> list[LabelledClip]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read the manifest: {e.strerror}") from None
    if path.suffix.lower() == ".csv":
        rows = [(n + 2, r) for n, r in enumerate(csv.DictReader(lines))]
    else:
        rows = []
        for n, line in enumerate(lines, start=1):
            if line.strip():
                try:
                    rows.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}:{n}: not valid JSON: {e.msg}") from None
    clips = [_clip(path, n, row) for n, row in rows]
    if not clips:
        raise ManifestError(f"{path}: no clips")
    return clips


def _clip(path: Path, line: int, row: dict) -> LabelledClip:
    if not isinstance(row, dict) or not row.get("uri"):
        raise ManifestError(f"{path}:{line}: each clip needs a 'uri'")
    text, is_label = row.get("caption"), False
    if not text:
        text, is_label = row.get("label"), True
    if not text or not isinstance(text, str):
        raise ManifestError(f"{path}:{line}: each clip needs a 'caption' or a 'label'")
    try:
        start = float(row.get("start_s") or 0.0)
        end = float(row["end_s"]) if row.get("end_s") not in (None, "") else None
    except (TypeError, ValueError):
        raise ManifestError(f"{path}:{line}: start_s and end_s must be numbers (seconds)") from None
    if end is not None and end <= start:
        raise ManifestError(f"{path}:{line}: end_s must be after start_s, got {start} .. {end}")
    uri = Path(row["uri"]).expanduser()
    return LabelledClip(str(uri if uri.is_absolute() else (path.parent / uri).resolve()), start, end, text, is_label)
