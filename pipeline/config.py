"""YAML pipeline definitions: one frozen dataclass per section, validated on entry.

A YAML file becomes a :class:`PipelineSpec`. Every problem is reported with the file line and the key
path (``pipeline.yaml:14 segments.window_s: must be > 0, got -2``), all problems at once, and the
YAML is only ever read with ``yaml.safe_load``'s constructors: a config never names code to run.
Relative paths are taken from the current working directory (the job's working directory on a cluster).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")


class ConfigError(ValueError):
    """One or more problems in a pipeline definition; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _check(fn, message: str) -> dict:
    """Field metadata: ``fn(value)`` must hold, else ``message`` (formatted with ``got``)."""
    return {"check": (fn, message)}


_POSITIVE = _check(lambda v: v > 0, "must be > 0, got {got}")
_NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0, got {got}")
_FRACTION = _check(lambda v: 0 < v < 1, "must be between 0 and 1, got {got}")
_OVERLAP = _check(lambda v: 0 <= v < 0.5, "must be in [0, 0.5), got {got}")


@dataclass(frozen=True)
class InputSpec:
    paths: tuple[str, ...] = ()  # video files, directories (recursive), globs, or filesystem URIs (s3://...)
    manifest: str | None = None  # a list of video URIs (.txt one per line, .jsonl/.csv with a uri field)
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS  # file suffixes picked up from directories and globs


@dataclass(frozen=True)
class DecodeSpec:
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: Decord, PyAV when Decord cannot open or read a file
    short_side_px: int | None = field(default=None, metadata=_POSITIVE)  # decoded short side, px; null: from tower
    exact: bool = True  # false: skip non-reference frames and take the nearest decoded frame (faster, coarser)
    threads: int = field(default=1, metadata=_POSITIVE)  # decoder threads per decode task
    timeout_s: float = field(default=120.0, metadata=_POSITIVE)  # a decode making no progress this long is ended
    chunk_segments: int = field(default=16, metadata=_POSITIVE)  # segments decoded (and held in memory) at a time
    recycle_after: int = field(default=100, metadata=_POSITIVE)  # videos per decoder process before a fresh one


@dataclass(frozen=True)
class SegmentsSpec:
    mode: Literal["window", "whole", "shots"] = "window"  # window: fixed windows; whole: one; shots: camera shots
    window_s: float = field(default=4.0, metadata=_POSITIVE)  # window length in seconds (shots: longer ones split)
    stride_s: float | None = field(default=None, metadata=_POSITIVE)  # seconds between window starts; null: window_s
    min_segment_s: float = field(default=1.0, metadata=_NON_NEGATIVE)  # last partial window kept if at least this long
    shot_threshold: float = field(default=0.35, metadata=_FRACTION)  # shots: cut where histograms differ more (0..1)
    min_shot_s: float = field(default=1.0, metadata=_NON_NEGATIVE)  # shots: no cut closer than this to the previous
    localize: bool = False  # window mode: windows at every scale of scales_s, merged into actions with true extents
    scales_s: tuple[float, ...] = (2.0, 4.0, 8.0)  # localize: window lengths, seconds (stride: half a window)

    def __post_init__(self):
        if self.localize and self.mode != "window":
            raise _FieldProblem("localize", "needs segments.mode: window")
        if not self.scales_s or any(v <= 0 for v in self.scales_s):
            raise _FieldProblem("scales_s", f"must be a list of positive seconds, got {list(self.scales_s)}")


@dataclass(frozen=True)
class SamplingSpec:
    strategy: Literal["uniform", "fps", "tsn"] = "uniform"  # uniform: evenly, centred; fps: at target_fps; tsn: random
    frames: int = field(default=8, metadata=_POSITIVE)  # frames per segment (uniform, tsn)
    target_fps: float = field(default=2.0, metadata=_POSITIVE)  # fps: frames per second of video
    max_frames: int = field(default=32, metadata=_POSITIVE)  # fps: at most this many frames per segment
    seed: int = 0  # tsn: random draws are fixed by (seed, video, segment)


@dataclass(frozen=True)
class TowerSpec:
    levels: tuple[int, ...] = (1,)  # pyramid levels: 1 whole frame, 2 a 2x2 grid of tiles, 3 a 4x4 grid
    fusion: Literal["global", "mean", "attention"] = "global"  # global: level 1; mean: all views; attention: trained
    fine_frames: int | str = "all"  # frames of a segment that get levels >= 2: all, middle, or a count k
    tile_overlap: float = field(default=0.125, metadata=_OVERLAP)  # fraction of a tile shared with its neighbour

    def __post_init__(self):
        if not self.levels or 1 not in self.levels or any(lv not in (1, 2, 3) for lv in self.levels):
            raise _FieldProblem("levels", f"must be a list of levels from 1, 2, 3 including 1, got {list(self.levels)}")
        if len(set(self.levels)) != len(self.levels):
            raise _FieldProblem("levels", f"must not repeat a level, got {list(self.levels)}")
        if self.fusion == "global" and self.levels != (1,):
            raise _FieldProblem("fusion", "'global' uses level 1 only; set tower.levels: [1] or fusion: mean")
        if not (self.fine_frames in ("all", "middle") or (isinstance(self.fine_frames, int) and self.fine_frames > 0)):
            raise _FieldProblem("fine_frames", f"must be all, middle or a positive count, got {self.fine_frames!r}")

    @property
    def view_levels(self) -> list[int]:
        """The level of each view of a frame, in the tower's order: the whole frame, then each level's tiles."""
        return [1] + [level for level in self.levels if level > 1 for _ in range(4 ** (level - 1))]


@dataclass(frozen=True)
class ModelSpec:
    family: Literal["clip", "align"] = "clip"  # model family of the checkpoint
    pretrained: str = "openai/clip-vit-base-patch32"  # Hugging Face hub id (org/name) or a local checkpoint directory
    local_files_only: bool = False  # never contact the hub (air-gapped clusters)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPUs and bf16 CPUs, else fp32
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the encoder worker has a GPU
    batch_size: int = field(default=8, metadata=_POSITIVE)  # images per backbone call

    def __post_init__(self):
        local = self.pretrained.startswith((".", "/", "~")) or os.path.isdir(self.pretrained)
        if local and not os.path.isdir(os.path.expanduser(self.pretrained)):
            raise _FieldProblem("pretrained", f"directory not found: {self.pretrained}")
        if not local and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", self.pretrained):
            raise _FieldProblem("pretrained", f"not a hub id (org/name) nor an existing directory: {self.pretrained}")


@dataclass(frozen=True)
class TemporalSpec:
    pooling: Literal["mean", "attention"] = "mean"  # how frame embeddings become one segment embedding
    checkpoint: str | None = None  # a head trained by `reeltag train` (its directory); attention pooling only

    def __post_init__(self):
        if self.checkpoint is not None:
            if not os.path.isfile(os.path.join(self.checkpoint, "head.safetensors")):
                raise _FieldProblem("checkpoint", f"no head.safetensors in {self.checkpoint}")
            if self.pooling != "attention":
                raise _FieldProblem("checkpoint", "a trained head needs temporal.pooling: attention")


@dataclass(frozen=True)
class TrainSpec:
    manifest: str | None = None  # labelled clips for `reeltag train` (.jsonl/.csv: uri, start_s, end_s, caption|label)
    eval_manifest: str | None = None  # held-out labelled clips for validation and `reeltag eval`
    # frozen: train the temporal head on cached frame embeddings; finetune: the whole model (from model.pretrained's
    # weights) and the head end to end; scratch: the same from fresh weights (model.pretrained gives the
    # architecture, tokenizer and preprocessing only)
    backbone: Literal["frozen", "finetune", "scratch"] = "frozen"
    loss: Literal["clip", "align"] = "clip"  # clip: symmetric InfoNCE; align: with label smoothing 0.1
    max_shift: float = field(default=0.0, metadata=_OVERLAP)  # whole-model training: random clip shift, of the side
    # whole-model training: weight of the same loss on the mean of each clip's frame embeddings (0: off)
    mean_loss: float = field(default=0.0, metadata=_NON_NEGATIVE)
    epochs: int = field(default=30, metadata=_POSITIVE)  # passes over the training clips
    batch_size: int = field(default=64, metadata=_POSITIVE)  # clips per step
    lr: float = field(default=1e-3, metadata=_POSITIVE)  # AdamW learning rate
    weight_decay: float = field(default=0.01, metadata=_NON_NEGATIVE)  # AdamW weight decay
    seed: int = 0  # initialisation and shuffling
    heads: int = field(default=4, metadata=_POSITIVE)  # attention heads of the temporal head
    layers: int = field(default=1, metadata=_POSITIVE)  # transformer blocks of the temporal head

    def __post_init__(self):
        for key in ("manifest", "eval_manifest"):
            value = getattr(self, key)
            if value is not None and not os.path.isfile(value):
                raise _FieldProblem(key, f"file not found: {value}")


@dataclass(frozen=True)
class TagsSpec:
    vocabulary: str | None = None  # label file, one label per line ('#' comments); null: embeddings only
    prompts: tuple[str, ...] = ("a video of {}.",)  # prompt templates, each with one {} for the label
    top_k: int = field(default=5, metadata=_POSITIVE)  # tags kept per segment, best first
    threshold: float = field(default=0.5, metadata=_FRACTION)  # localize: confidence at which a window is an action

    def __post_init__(self):
        if self.vocabulary is not None and not os.path.isfile(self.vocabulary):
            raise _FieldProblem("vocabulary", f"file not found: {self.vocabulary}")
        for template in self.prompts:
            if template.count("{}") != 1:
                raise _FieldProblem("prompts", f"each template needs exactly one {{}}, got {template!r}")
        if not self.prompts:
            raise _FieldProblem("prompts", "needs at least one template")


@dataclass(frozen=True)
class OutputSpec:
    dir: str = ""  # output directory (segments/, errors/, run.json); required
    shard_rows: int = field(default=4096, metadata=_POSITIVE)  # segment rows buffered before a shard is written

    def __post_init__(self):
        if not self.dir:
            raise _FieldProblem("dir", "required: where segments/, errors/ and run.json are written")


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None  # null: start an embedded local Ray; 'auto' or host:port: join a cluster
    num_cpus: int | None = field(default=None, metadata=_POSITIVE)  # CPUs of the embedded Ray; null: all
    decode_cpus: float = field(default=1.0, metadata=_POSITIVE)  # CPUs reserved per decode task
    encoder_actors: int = field(default=1, metadata=_POSITIVE)  # encoder actors (each loads the model once)
    encoder_cpus: float = field(default=1.0, metadata=_POSITIVE)  # CPUs reserved per encoder actor
    threads_per_actor: int = field(default=1, metadata=_POSITIVE)  # torch threads in each encoder actor
    gpus_per_actor: float = field(default=0.0, metadata=_NON_NEGATIVE)  # GPUs per encoder actor
    verbose: bool = False  # show Ray's own logs and progress bars


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline; built by :func:`load_spec`, which fills every section (missing ones take defaults)."""

    input: InputSpec
    decode: DecodeSpec
    segments: SegmentsSpec
    sampling: SamplingSpec
    tower: TowerSpec
    model: ModelSpec
    temporal: TemporalSpec
    tags: TagsSpec
    output: OutputSpec
    ray: RaySpec
    train: TrainSpec

    def __post_init__(self):
        from .sources import SourceError, expand

        if not self.has_input and self.train.manifest is None:  # a training config may have no archive to tag
            raise _FieldProblem("input.paths", INPUT_REQUIRED)
        if self.tower.fusion == "attention" and self.temporal.checkpoint:  # the fusion is trained with the head
            trained = _trained_view_levels(self.temporal.checkpoint)
            if trained != self.tower.view_levels:
                found = "no view fusion" if trained is None else f"a fusion of levels {sorted(set(trained))}"
                raise _FieldProblem("tower.fusion", f"attention needs a fusion trained for levels "
                                    f"{list(self.tower.levels)} and temporal.checkpoint has {found}: `reeltag "
                                    "train` with this tower (train.backbone: frozen) trains one")
        if self.input.manifest is not None and not os.path.isfile(self.input.manifest):
            raise _FieldProblem("input.manifest", f"file not found: {self.input.manifest}")
        for i, pattern in enumerate(self.input.paths):
            try:
                found = expand(pattern, self.input.extensions)
            except SourceError as e:
                raise _FieldProblem(f"input.paths.{i}", str(e)) from None
            if not found:
                what = "no video files match" if glob.has_magic(pattern) or os.path.isdir(pattern) else "not found"
                raise _FieldProblem(f"input.paths.{i}", f"{what}: {pattern}")

    @property
    def has_input(self) -> bool:
        return bool(self.input.paths or self.input.manifest)

    @property
    def stride_s(self) -> float:
        return self.segments.stride_s or self.segments.window_s

    def config_hash(self) -> str:
        """Hash of everything that changes a segment row; input, output and Ray placement do not."""
        parts = {k: dataclasses.asdict(getattr(self, k)) for k in ("decode", "segments", "sampling", "tower", "model",
                                                                     "temporal", "tags")}
        # retrained in place, a local model or head changes the embeddings: hash their weights, not only the path
        local = os.path.expanduser(self.model.pretrained)
        if os.path.isdir(local):
            parts["model"]["weights"] = _weights_digest(
                f for f in glob.glob(os.path.join(local, "*")) if f.endswith((".safetensors", ".bin")))
        if self.temporal.checkpoint:
            parts["temporal"]["checkpoint"] = _weights_digest([os.path.join(self.temporal.checkpoint,
                                                                             "head.safetensors")])
        parts["model"].pop("batch_size")
        parts["decode"].pop("threads")
        if self.tags.vocabulary:
            parts["tags"]["vocabulary"] = hashlib.sha256(Path(self.tags.vocabulary).read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]

    def model_id(self) -> str:
        return f"{self.model.family}:{self.model.pretrained}"

    def videos(self) -> list[str]:
        """All input videos (absolute paths or URIs), sorted, without duplicates."""
        from .sources import expand, read_uri_list

        found = {p for pattern in self.input.paths for p in expand(pattern, self.input.extensions)}
        if self.input.manifest:
            found.update(read_uri_list(self.input.manifest))
        return sorted(found)


def _trained_view_levels(checkpoint: str) -> list[int] | None:
    """The levels of the views whose fusion was trained with the head in ``checkpoint`` (None: no fusion)."""
    meta = os.path.join(checkpoint, "head.json")
    if not os.path.isfile(meta):
        return None
    try:
        with open(meta) as f:
            return json.load(f).get("view_levels")
    except (OSError, ValueError) as e:
        raise _FieldProblem("temporal.checkpoint", f"cannot read {meta}: {e}") from None


def _weights_digest(paths) -> str:
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


INPUT_REQUIRED = "required: video files, directories, globs or URIs (or input.manifest)"


class _FieldProblem(Exception):
    """Raised inside a section's ``__post_init__``: ``key`` is relative to that section."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message


# --------------------------------------------------------------------------------------------------
# Loading: YAML text -> plain data with a source location per key path -> dataclasses


def load_spec(path: str | os.PathLike, overrides: list[str] = ()) -> PipelineSpec:
    """Read a pipeline YAML file, apply ``--set key.path=value`` overrides, validate; raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config: {e.strerror or e}"]) from None
    return parse_spec(text, source=str(path), overrides=overrides)


def parse_spec(text: str, *, source: str = "<string>", overrides: list[str] = ()) -> PipelineSpec:
    data, where = _read_yaml(text, source)
    for item in overrides:
        _apply_override(data, where, item)
    problems: list[str] = []
    spec = _build(PipelineSpec, data, (), where, problems)
    if problems:
        raise ConfigError(problems)
    return spec


def _read_yaml(text: str, source: str) -> tuple[dict, dict[tuple, str]]:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{source}{line}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    if root is None:
        return {}, {(): source}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError([f"{source}:{root.start_mark.line + 1}: the top level must be a mapping of sections"])
    where: dict[tuple, str] = {(): source}
    problems: list[str] = []
    _index_lines(root, (), source, where, problems)
    if problems:
        raise ConfigError(problems)
    return data, where


def _index_lines(node: yaml.Node, key: tuple, source: str, where: dict, problems: list[str]) -> None:
    """Record ``file:line`` for every key path, and refuse duplicate keys (safe_load silently keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen = set()
        for k, v in node.value:
            name = str(k.value)
            child = (*key, name)
            if name in seen:
                problems.append(f"{source}:{k.start_mark.line + 1} {'.'.join(child)}: duplicate key")
            seen.add(name)
            where[child] = f"{source}:{k.start_mark.line + 1}"
            _index_lines(v, child, source, where, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            where[(*key, str(i))] = f"{source}:{v.start_mark.line + 1}"
            _index_lines(v, (*key, str(i)), source, where, problems)


def _apply_override(data: dict, where: dict, item: str) -> None:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([f"--set {item}: expected key.path=value, e.g. --set segments.window_s=4"])
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {item}: the value is not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    parts = tuple(key.strip().split("."))
    node = data
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part) if isinstance(node, dict) else None
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError([f"--set {item}: {'.'.join(parts[:depth + 1])} is not a section"])
        node = child
    node[parts[-1]] = value
    for known in [k for k in where if k[:len(parts)] == parts]:
        del where[known]
    for depth in range(1, len(parts) + 1):
        where[parts[:depth]] = "--set"


def _locate(where: dict, key: tuple) -> str:
    for n in range(len(key), -1, -1):
        if key[:n] in where:
            return where[key[:n]]
    return ""


def _problem(where: dict, key: tuple, message: str) -> str:
    return f"{_locate(where, key)} {'.'.join(key)}: {message}".strip()


def _build(cls: type, data: Any, key: tuple, where: dict, problems: list[str]) -> Any:
    """Turn ``data`` into ``cls``; append every problem found to ``problems`` and return None if any."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(_problem(where, key, f"expected a mapping of keys, got {_kind(data)}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            hint = f"; known keys: {', '.join(fields)}"
            problems.append(_problem(where, (*key, str(name)), f"unknown key{hint}"))
    kwargs, before = {}, len(problems)
    for name, value in data.items():
        if name not in fields:
            continue
        sub = (*key, name)
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], value, sub, where, problems)
            continue
        ok, converted, message = _convert(hints[name], value)
        if not ok:
            problems.append(_problem(where, sub, message))
            continue
        check = fields[name].metadata.get("check")
        if check and converted is not None and not check[0](converted):
            problems.append(_problem(where, sub, check[1].format(got=value)))
            continue
        kwargs[name] = converted
    for name in fields:  # sections not given in the YAML still validate their defaults
        if name not in data and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, (*key, name), where, problems)
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except _FieldProblem as e:
        problems.append(_problem(where, (*key, *e.key.split(".")), e.message))
        return None


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), type(value).__name__
                                                                                      + f" {value!r}")


def _convert(hint: Any, value: Any) -> tuple[bool, Any, str]:
    """Check ``value`` against a field's type hint; return (ok, converted value, problem)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return True, None, ""
        results = [_convert(a, value) for a in args if a is not type(None)]
        return next((r for r in results if r[0]), results[0])
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return True, value, ""
        return False, None, f"must be one of {', '.join(map(str, args))}, got {value!r}"
    if origin is tuple:
        items = [value] if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
        if not isinstance(items, list):
            return False, None, f"expected a list, got {_kind(value)}"
        out = []
        for i, item in enumerate(items):
            ok, converted, message = _convert(args[0], item)
            if not ok:
                return False, None, f"item {i}: {message}"
            out.append(converted)
        return True, tuple(out), ""
    if hint is bool:
        if isinstance(value, bool):
            return True, value, ""
        return False, None, f"expected true or false, got {_kind(value)}"
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value, ""
        return False, None, f"expected a whole number, got {_kind(value)}"
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value), ""
        return False, None, f"expected a number, got {_kind(value)}"
    if hint is str:
        if isinstance(value, str):
            return True, value, ""
        return False, None, f"expected a string, got {_kind(value)}"
    raise TypeError(f"unsupported config field type {hint!r}")  # a programming error in this module
