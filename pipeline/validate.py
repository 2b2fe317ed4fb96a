"""Checking a parsed spec against the world, on the driver: what it names on disk, its inputs (listed once), the
model rules, ``dtype: auto`` resolved for the encoder workers' device, and the config hash of what changes a row.

:mod:`pipeline.config` is the schema and touches nothing; this module reads files and, through ``encoders``, loads
torch, so the decode workers and decoder processes (which only read the schema) never import either.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from encoders.models import resolve_dtype
from encoders.text import VocabularyError, load_vocabulary
from encoders.video_text import model_problems, worker_device

from .config import INPUT_REQUIRED, ConfigError, PipelineSpec, located
from .sources import SourceError, expand, read_uri_list

_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~"))


def is_local_model(pretrained: str) -> bool:
    """Whether ``model.pretrained`` names a local directory: it starts with ``.``, ``/`` or ``~``, or is a directory
    that exists (``models/synthactions``), or cannot be a hub id (``runs/a/model``). Reads the filesystem."""
    return _looks_like_path(pretrained) or os.path.isdir(pretrained) or not _HUB_ID.fullmatch(pretrained)



def resolved(spec: PipelineSpec) -> PipelineSpec:
    """``spec`` with ``model.device`` and ``model.dtype: auto`` replaced by what the encoder workers use (bf16 on
    GPUs, int8 on x86 CPUs: :func:`encoders.models.resolve_dtype`), so the driver decides once and every worker,
    whatever its own CPU, computes what the config hash says."""
    device = worker_device(spec.model, spec.ray)
    dtype = spec.model.dtype
    if dtype == "auto":
        dtype = resolve_dtype("auto", torch.device(device))
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, device=device, dtype=dtype))


COMMANDS = ("run", "index", "validate", "train", "eval")


def check_spec(spec: PipelineSpec, *, command: str = "run", skipped: Counter | None = None) -> list[str]:
    """Check what the spec names on disk and list its inputs once: raise ConfigError (every problem, each with its
    file:line and key) or return the input videos, sorted, deduplicated (empty for train/eval configs without
    inputs). ``command``: run and index need inputs; train and eval read train manifests; validate needs inputs or
    train.manifest, and checks a config with train.manifest as `reeltag train` would (it may train the fusion).
    ``skipped`` counts the files the inputs' directories and globs left out, by suffix (:func:`sources.expand`)."""
    if command not in COMMANDS:
        raise ValueError(f"command must be one of {', '.join(COMMANDS)}, got {command!r}")
    videos, problems = _find_inputs(spec, Counter() if skipped is None else skipped)
    if not spec.has_input and (command in ("run", "index") or (command == "validate" and not spec.train.manifest)):
        problems.append(("input.paths", INPUT_REQUIRED + (f" for `reeltag {command}`" if command != "validate"
                                                          else "")))
    problems += _model_directory_problems(spec.model.pretrained)
    training = command == "train" or (command == "validate" and spec.train.manifest is not None)
    problems += model_problems(spec, training=training)  # temporal.checkpoint and the fusion it holds
    for key, value in (("tags.vocabulary", spec.tags.vocabulary), ("train.manifest", spec.train.manifest),
                       ("train.eval_manifest", spec.train.eval_manifest)):
        if value is not None and not os.path.isfile(value):
            problems.append((key, f"file not found: {value}"))
    if spec.tags.vocabulary is not None and os.path.isfile(spec.tags.vocabulary):
        try:  # a repeated label or a file that is not text: here, not as tracebacks in the encoder actors
            load_vocabulary(spec.tags.vocabulary)
        except (VocabularyError, UnicodeDecodeError, OSError) as e:
            problems.append(("tags.vocabulary", str(e).splitlines()[0]))
    if problems:
        raise ConfigError([located(spec.locations, tuple(key.split(".")), message) for key, message in problems])
    return videos


def _model_directory_problems(pretrained: str) -> list[tuple[str, str]]:
    """A hub id is taken as written (the hub is asked when the model loads); a local directory must exist."""
    if not is_local_model(pretrained) or os.path.isdir(os.path.expanduser(pretrained)):
        return []
    if _looks_like_path(pretrained):
        return [("model.pretrained", f"directory not found: {pretrained}")]
    return [("model.pretrained", f"not a hub id (org/name) nor an existing directory: {pretrained}")]


def _find_inputs(spec: PipelineSpec, skipped: Counter) -> tuple[list[str], list[tuple[str, str]]]:
    """The input videos (absolute paths or URIs), sorted, without duplicates, and a ``(key, message)`` for each
    input that names none. The one place inputs are listed (a recursive listing of a bucket can be slow)."""
    found, problems = set(), []
    for i, pattern in enumerate(spec.input.paths):
        try:
            matched = expand(pattern, spec.input.extensions, skipped)
        except SourceError as e:
            problems.append((f"input.paths.{i}", str(e)))
            continue
        if not matched:
            what = "no video files match" if glob.has_magic(pattern) or os.path.isdir(pattern) else "not found"
            problems.append((f"input.paths.{i}", f"{what}: {pattern}"))
        found.update(matched)
    if spec.input.manifest is not None:
        if not os.path.isfile(spec.input.manifest):
            problems.append(("input.manifest", f"file not found: {spec.input.manifest}"))
        else:
            try:
                found.update(read_uri_list(spec.input.manifest))
            except SourceError as e:
                problems.append(("input.manifest", str(e)))
    return sorted(found), problems


def _weights_digest(paths: Iterable[str]) -> str:
    """SHA-256 over the files' content (in path order), cached while no file's size or mtime changes."""
    return _digest(tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in sorted(paths)))


@functools.lru_cache(maxsize=16)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for path, _, _ in files:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()



def _row_fields(obj: object) -> dict:
    """The fields of a spec (or section) that change a segment row, as plain data (sections as dicts)."""
    out = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("output", True):
            value = getattr(obj, f.name)
            out[f.name] = _row_fields(value) if dataclasses.is_dataclass(value) else value
    return out



def config_hash(spec: PipelineSpec) -> str:
    """Hash of every field that changes a segment row (not those marked ``_SAME_ROWS``), with ``dtype: auto``
    and ``device: auto`` as they resolve, and the content of a local model's weights, the head and the
    vocabulary (retrained or edited in place, they change the rows under the same path)."""
    spec = resolved(spec)
    parts = _row_fields(spec)
    if spec.regions == type(spec.regions)():  # outputs from before the regions section keep their hash
        del parts["regions"]
    local = os.path.expanduser(spec.model.pretrained)
    if os.path.isdir(local):
        parts["model"]["weights"] = _weights_digest(
            f for f in glob.glob(os.path.join(local, "*")) if f.endswith((".safetensors", ".bin")))
    if spec.temporal.checkpoint:
        parts["temporal"]["checkpoint"] = _weights_digest([os.path.join(spec.temporal.checkpoint,
                                                                         "head.safetensors")])
    if spec.tags.vocabulary:
        parts["tags"]["vocabulary"] = hashlib.sha256(Path(spec.tags.vocabulary).read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

