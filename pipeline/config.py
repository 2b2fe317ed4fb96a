"""YAML pipeline definitions: one frozen dataclass per section, validated on entry.

A YAML file becomes a :class:`PipelineSpec` (:func:`load_spec`, :func:`parse_spec`): pure data, checked for
types, ranges and rules between values, without touching the filesystem. :func:`check_spec` then checks what
the spec names on disk (model, head, vocabulary, manifests, inputs) and lists the input videos once. Every
problem is reported with the file line and the key path (``pipeline.yaml:14 segments.window_s: must be > 0,
got -2``), all problems at once, and the YAML is only ever read with ``yaml.safe_load``'s constructors: a config
never names code to run. Relative paths are taken from the current working directory (the job's working
directory on a cluster).
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# What archives hold: web and phones (mp4 m4v mov webm 3gp 3g2), post-production and broadcast (mxf mov ts m2ts mts
# m2t mpg vob), camcorders (dv mts m2ts), legacy (avi wmv asf flv f4v rm rmvb ogv mpeg m2v mpe), raw streams (mkv
# y4m ivf h264 h265 hevc nut)
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".mpe", ".m2v", ".ts",
                    ".m2ts", ".mts", ".m2t", ".mxf", ".dv", ".3gp", ".3g2", ".flv", ".f4v", ".wmv", ".asf", ".vob",
                    ".ogv", ".rm", ".rmvb", ".y4m", ".ivf", ".h264", ".h265", ".hevc", ".nut")


class ConfigError(ValueError):
    """One or more problems in a pipeline definition; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _check(fn, message: str) -> dict:
    """Field metadata: ``fn(value)`` must hold, else ``message`` (formatted with ``got``)."""
    return {"check": (fn, message)}


def _up_to(limit: float) -> dict:
    """Field metadata: a positive value of at most ``limit`` (a value past it would explode the work of a run)."""
    return _check(lambda v: 0 < v <= limit, f"must be > 0 and at most {limit:g}, got {{got}}")


_POSITIVE = _check(lambda v: v > 0, "must be > 0, got {got}")
_A_FRAME_OR_MORE = _check(lambda v: v >= 0.01, "must be at least 0.01 s (a frame), got {got}")  # finer: millions
_NON_NEGATIVE = _check(lambda v: v >= 0, "must be >= 0, got {got}")
_FRACTION = _check(lambda v: 0 < v < 1, "must be between 0 and 1, got {got}")
_OVERLAP = _check(lambda v: 0 <= v < 0.5, "must be in [0, 0.5), got {got}")
# A field (or a whole section) marked so does not change a segment row: config_hash leaves it out, so changing it
# never redoes finished videos. Every other field is hashed.
_SAME_ROWS = {"output": False}
_PATH = {"path": True}  # a path: a leading ~ is the user's home, as in a shell (not a directory named ~)


@dataclass(frozen=True)
class InputSpec:
    # video files, directories (recursive), globs, or filesystem URIs (s3://...)
    paths: tuple[str, ...] = field(default=(), metadata=_PATH)
    # a list of video URIs (.txt one per line, .jsonl/.csv with a uri field)
    manifest: str | None = field(default=None, metadata=_PATH)
    extensions: tuple[str, ...] = VIDEO_EXTENSIONS  # file suffixes picked up from directories and globs


@dataclass(frozen=True)
class DecodeSpec:
    backend: Literal["auto", "decord", "pyav"] = "auto"  # auto: Decord, PyAV when Decord cannot open or read a file
    short_side_px: int | None = field(default=None, metadata=_POSITIVE)  # decoded short side, px; null: from tower
    exact: bool = True  # false: skip non-reference frames and take the nearest decoded frame (faster, coarser)
    threads: int = field(default=1, metadata={**_up_to(256), **_SAME_ROWS})  # decoder threads per decode task
    # a decode making no progress this long is ended, seconds
    timeout_s: float = field(default=120.0, metadata={**_up_to(86400), **_SAME_ROWS})
    # segments decoded (and held in memory) at a time
    chunk_segments: int = field(default=16, metadata={**_up_to(4096), **_SAME_ROWS})
    # videos per decoder process before a fresh one
    recycle_after: int = field(default=100, metadata={**_POSITIVE, **_SAME_ROWS})
    # runs that try a video whose failure was transient (timeout, decoder_crashed, io_error) before it is final
    max_attempts: int = field(default=3, metadata={**_up_to(100), **_SAME_ROWS})
    # Bounded work per file, whatever its header says: a video past a limit is an errors row of its own type.
    # Generous for real video (48 h, 8K, 12:1); hostile files (a 1.4 KB file declaring 90 h, a 1024x2 stream
    # decoded at 114688x224) stop here. Not hashed; what a limit refused is final: after raising the limit,
    # `reeltag run --retry-failed` does it again.
    max_duration_s: float = field(default=172_800.0, metadata={**_POSITIVE, **_SAME_ROWS})  # too_long
    max_pixels: int = field(default=7680 * 4320, metadata={**_POSITIVE, **_SAME_ROWS})  # too_large: per frame
    max_aspect: float = field(default=12.0, metadata={**_POSITIVE, **_SAME_ROWS})  # bad_aspect: long side / short
    # address space of a decoder process, MiB (a file that makes FFmpeg allocate more is an error, not an OOM)
    max_memory_mb: int | None = field(default=8192, metadata={**_POSITIVE, **_SAME_ROWS})


@dataclass(frozen=True)
class SegmentsSpec:
    mode: Literal["window", "whole", "shots"] = "window"  # window: fixed windows; whole: one; shots: camera shots
    # window length in seconds (shots: longer ones split)
    window_s: float = field(default=4.0, metadata=_A_FRAME_OR_MORE)
    # seconds between window starts; null: window_s
    stride_s: float | None = field(default=None, metadata=_A_FRAME_OR_MORE)
    min_segment_s: float = field(default=1.0, metadata=_NON_NEGATIVE)  # last partial window kept if at least this long
    shot_threshold: float = field(default=0.35, metadata=_FRACTION)  # shots: cut where histograms differ more (0..1)
    min_shot_s: float = field(default=1.0, metadata=_NON_NEGATIVE)  # shots: no cut closer than this to the previous
    localize: bool = False  # window mode: windows at every scale of scales_s, merged into actions with true extents
    scales_s: tuple[float, ...] = (2.0, 4.0, 8.0)  # localize: window lengths, seconds (stride: half a window)

    def __post_init__(self):
        if self.localize and self.mode != "window":
            raise _FieldProblem("localize", "needs segments.mode: window")
        if not self.scales_s or any(v < 0.01 for v in self.scales_s):
            raise _FieldProblem("scales_s", f"must be a list of seconds, each at least 0.01, got {list(self.scales_s)}")


@dataclass(frozen=True)
class SamplingSpec:
    strategy: Literal["uniform", "fps", "tsn"] = "uniform"  # uniform: evenly, centred; fps: at target_fps; tsn: random
    frames: int = field(default=8, metadata=_up_to(512))  # frames per segment (uniform, tsn)
    target_fps: float = field(default=2.0, metadata=_up_to(1000))  # fps: frames per second of video
    max_frames: int = field(default=32, metadata=_up_to(2048))  # fps: at most this many frames per segment
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
    # model family of the checkpoint (README "Model families"); auto: from the checkpoint's model_type
    family: Literal["auto", "clip", "align", "siglip", "metaclip2", "xclip"] = "clip"
    # Hugging Face hub id (org/name) or a local checkpoint directory (see pipeline.validate.is_local_model)
    pretrained: str = field(default="openai/clip-vit-base-patch32", metadata=_PATH)
    local_files_only: bool = field(default=False, metadata=_SAME_ROWS)  # never contact the hub (air-gapped clusters)
    # int8: dynamic quantisation of the linear layers (CPUs); auto: bf16 on GPUs, int8 on x86 CPUs, else bf16 where
    # native, else fp32 (README "Model families")
    dtype: Literal["auto", "float32", "bfloat16", "int8"] = "auto"
    # auto: cuda when the encoder worker has a GPU. Hashed as the device it resolves to (worker_device): CUDA
    # kernels give other numbers than CPU ones, as dtype does
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # images per backbone call; null: 16 CPU, 256 GPU (batching does not change what a segment gets)
    batch_size: int | None = field(default=None, metadata={**_POSITIVE, **_SAME_ROWS})

    def __post_init__(self):
        if not self.pretrained.strip():
            raise _FieldProblem("pretrained", "required: a hub id (org/name) or a local checkpoint directory")


@dataclass(frozen=True)
class TemporalSpec:
    # how frame embeddings become one segment embedding; model: the checkpoint's own temporal model (xclip)
    pooling: Literal["mean", "attention", "model"] = "mean"
    # a head trained by `reeltag train` (its directory); attention pooling only
    checkpoint: str | None = field(default=None, metadata=_PATH)


_PROBABILITY = _check(lambda v: 0 <= v <= 1, "must be between 0 and 1, got {got}")


@dataclass(frozen=True)
class AugmentSpec:
    """Whole-model training: augmentation of the cached frames, on the fly (temporal/augment.py). Never hue or
    flips: nothing that changes a label. Each clip draws its own values, the same for all its frames."""

    brightness: float = field(default=0.0, metadata=_OVERLAP)  # add up to +-this x 255
    contrast: float = field(default=0.0, metadata=_OVERLAP)  # scale around the clip's mean by 1 +- this
    gamma: float = field(default=0.0, metadata=_OVERLAP)  # x ** exp(+-this)
    blur: float = field(default=0.0, metadata=_PROBABILITY)  # share of clips blurred (Gaussian, sigma 0.3-1.2 px)
    noise: float = field(default=0.0, metadata=_OVERLAP)  # per-frame Gaussian noise of std up to this x 255
    jpeg: float = field(default=0.0, metadata=_PROBABILITY)  # share of clips re-compressed (JPEG quality 20-80)
    crop: float = field(default=0.0, metadata=_OVERLAP)  # zoom into a window of at least 1 - this of each side

    def __bool__(self) -> bool:
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class TrainSpec:
    # labelled clips for `reeltag train` (.jsonl/.csv: uri, start_s, end_s, caption|label)
    manifest: str | None = field(default=None, metadata=_PATH)
    # held-out labelled clips for validation and `reeltag eval`
    eval_manifest: str | None = field(default=None, metadata=_PATH)
    # frozen: train the temporal head on cached frame embeddings; finetune: the whole model (from model.pretrained's
    # weights) and the head end to end; scratch: the same from fresh weights (model.pretrained gives the
    # architecture, tokenizer and preprocessing only)
    backbone: Literal["frozen", "finetune", "scratch"] = "frozen"
    loss: Literal["clip", "align"] = "clip"  # clip: symmetric InfoNCE; align: with label smoothing 0.1
    max_shift: float = field(default=0.0, metadata=_OVERLAP)  # whole-model training: random clip shift, of the side
    # whole-model training: weight of the same loss on the mean of each clip's frame embeddings (0: off)
    mean_loss: float = field(default=0.0, metadata=_NON_NEGATIVE)
    # whole-model training: bfloat16 runs the model's matmuls in bf16 (autocast; weights, gradients' sums and
    # optimizer stay fp32), ~2x a step on CPUs with native bf16; auto: bfloat16 where the CPU has it (AVX512_BF16,
    # AMX), else float32 (emulated bf16 is slower than fp32)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    epochs: int = field(default=30, metadata=_POSITIVE)  # passes over the training clips
    batch_size: int = field(default=64, metadata=_POSITIVE)  # clips per step
    lr: float = field(default=1e-3, metadata=_POSITIVE)  # AdamW learning rate
    weight_decay: float = field(default=0.01, metadata=_NON_NEGATIVE)  # AdamW weight decay
    seed: int = 0  # initialisation and shuffling
    heads: int = field(default=4, metadata=_POSITIVE)  # attention heads of the temporal head
    layers: int = field(default=1, metadata=_POSITIVE)  # transformer blocks of the temporal head
    augment: AugmentSpec = field(default_factory=AugmentSpec)  # whole-model training: augmentation of the frames

    def __post_init__(self):
        for key in ("max_shift", "mean_loss", "augment"):  # a key the mode does not use is an error, not ignored
            if self.backbone == "frozen" and getattr(self, key):
                raise _FieldProblem(key, "is used only when the whole model trains (train.backbone: finetune or "
                                         "scratch); with frozen, frames are embedded once")
        if self.backbone == "frozen" and self.precision != "auto":
            raise _FieldProblem("precision", "is used only when the whole model trains (train.backbone: finetune "
                                             "or scratch); a frozen backbone's head trains in float32")


@dataclass(frozen=True)
class TagsSpec:
    # label file, one label per line ('#' comments); null: embeddings only
    vocabulary: str | None = field(default=None, metadata=_PATH)
    prompts: tuple[str, ...] = ("a video of {}.",)  # prompt templates, each with one {} for the label
    top_k: int = field(default=5, metadata=_up_to(10_000))  # tags kept per segment, best first
    # localize: confidence at which a window is an action (hashed: it changes the actions table)
    threshold: float = field(default=0.5, metadata=_FRACTION)

    def __post_init__(self):
        for template in self.prompts:
            if template.count("{}") != 1:
                raise _FieldProblem("prompts", f"each template needs exactly one {{}}, got {template!r}")
        if not self.prompts:
            raise _FieldProblem("prompts", "needs at least one template")


@dataclass(frozen=True)
class RegionsSpec:
    # what region_tags hold: tiles: each tile's best label (tower levels >= 2); owlv2: object boxes found by an
    # open-vocabulary detector for the vocabulary's labels
    detector: Literal["tiles", "owlv2"] = "tiles"
    # owlv2: its checkpoint, a hub id or a local directory (loaded like model.pretrained, model.local_files_only)
    pretrained: str = field(default="google/owlv2-base-patch16-ensemble", metadata=_PATH)
    frames: int | str = "middle"  # owlv2: frames of a segment it looks at: middle, all, or a count k spread evenly
    threshold: float = field(default=0.3, metadata=_FRACTION)  # owlv2: least box probability kept
    # owlv2: a box overlapping a better box of its label by more than this is dropped (non-maximum suppression)
    nms_iou: float = field(default=0.3, metadata=_FRACTION)
    max_boxes: int = field(default=10, metadata=_up_to(1000))  # owlv2: boxes kept per segment, best first

    def __post_init__(self):
        if not (self.frames in ("all", "middle") or (isinstance(self.frames, int) and self.frames > 0)):
            raise _FieldProblem("frames", f"must be all, middle or a positive count, got {self.frames!r}")


@dataclass(frozen=True)
class OutputSpec:
    dir: str = field(default="", metadata=_PATH)  # output directory (segments/, errors/, run.json); required
    shard_rows: int = field(default=4096, metadata=_POSITIVE)  # segment rows buffered before a shard is written

    def __post_init__(self):
        if not self.dir:
            raise _FieldProblem("dir", "required: where segments/, errors/ and run.json are written")


@dataclass(frozen=True)
class RaySpec:
    address: str | None = None  # null: start an embedded local Ray; 'auto' or host:port: join a cluster
    num_cpus: int | None = field(default=None, metadata=_POSITIVE)  # CPUs of the embedded Ray; null: all
    # CPUs reserved per decode task and per encoder actor; null: fitted to the cluster when the job starts (1 each
    # where the encoder actors leave room for a decode task, else equal shares: the default plan runs on 1 CPU)
    decode_cpus: float | None = field(default=None, metadata=_POSITIVE)
    encoder_actors: int = field(default=1, metadata=_up_to(4096))  # encoder actors (each loads the model once)
    encoder_cpus: float | None = field(default=None, metadata=_POSITIVE)
    threads_per_actor: int = field(default=1, metadata=_POSITIVE)  # torch threads in each encoder actor
    gpus_per_actor: float = field(default=0.0, metadata=_NON_NEGATIVE)  # GPUs per encoder actor
    # seconds a stage may wait for resources Ray cannot give it (a node lost, a cluster taken by others) before the
    # job says which and stops; null: wait for ever
    unschedulable_s: float | None = field(default=60.0, metadata=_up_to(86400))
    verbose: bool = False  # show Ray's own logs and progress bars


@dataclass(frozen=True)
class PipelineSpec:
    """A whole pipeline; built by :func:`load_spec`, which fills every section (missing ones take defaults), and
    checked against the filesystem by :func:`check_spec`."""

    input: InputSpec = field(metadata=_SAME_ROWS)
    decode: DecodeSpec
    segments: SegmentsSpec
    sampling: SamplingSpec
    tower: TowerSpec
    model: ModelSpec
    temporal: TemporalSpec
    tags: TagsSpec
    regions: RegionsSpec
    output: OutputSpec = field(metadata=_SAME_ROWS)
    ray: RaySpec = field(metadata=_SAME_ROWS)  # placement only (and the device it gives the encoders)
    train: TrainSpec = field(metadata=_SAME_ROWS)  # read by `reeltag train`/`eval`, never by the pipeline
    # ``file:line`` (or ``--set``) of each key path as a tuple, e.g. ("tags", "vocabulary"), for check_spec's messages
    locations: dict[tuple, str] = field(default_factory=dict, compare=False, repr=False,
                                        metadata={**_SAME_ROWS, "yaml": False})

    @property
    def has_input(self) -> bool:
        return bool(self.input.paths or self.input.manifest)

    @property
    def stride_s(self) -> float:
        return self.segments.stride_s or self.segments.window_s

    def model_id(self) -> str:
        return f"{self.model.family}:{self.model.pretrained}"

INPUT_REQUIRED = "required: video files, directories, globs or URIs (or input.manifest)"


class _FieldProblem(Exception):
    """Raised inside a section's ``__post_init__``: ``key`` is relative to that section."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message


# --------------------------------------------------------------------------------------------------
# Loading: YAML text -> plain data with a source location per key path -> dataclasses


MAX_CONFIG_BYTES = 1 << 20  # a pipeline definition is a page of YAML, not a data file
MAX_CONFIG_VALUES = 10_000  # keys and items, aliases expanded: a 342-byte alias bomb expands to millions
MAX_CONFIG_DEPTH = 32  # nesting levels


def load_spec(path: str | os.PathLike, overrides: list[str] = ()) -> PipelineSpec:
    """Read a pipeline YAML file, apply ``--set key.path=value`` overrides, validate; raise ConfigError."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the config: {e.strerror or e}"]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: {len(data):,} bytes: a pipeline definition is at most {MAX_CONFIG_BYTES:,}"])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError([f"{path}:{line}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r})"]) from None
    return parse_spec(text, source=str(path), overrides=overrides)


def parse_spec(text: str, *, source: str = "<string>", overrides: list[str] = ()) -> PipelineSpec:
    data, where = _read_yaml(text, source)
    for item in overrides:
        _apply_override(data, where, item)
    problems: list[str] = []
    spec = _build(PipelineSpec, data, (), where, problems)
    if problems:
        raise ConfigError(problems)
    return dataclasses.replace(spec, locations=where)


def _read_yaml(text: str, source: str) -> tuple[dict, dict[tuple, str]]:
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{source}: {len(text):,} characters: a pipeline definition is at most "
                           f"{MAX_CONFIG_BYTES:,}"])
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{source}{line}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: nested deeper than YAML can be read (at most {MAX_CONFIG_DEPTH} levels)"]) \
            from None
    if root is None:
        return {}, {(): source}
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError([f"{source}:{root.start_mark.line + 1}: the top level must be a mapping of sections"])
    where: dict[tuple, str] = {(): source}
    problems: list[str] = []
    _index_lines(root, (), source, where, problems)
    if problems:
        raise ConfigError(problems[:20])
    try:
        return yaml.safe_load(text), where  # now known to be small: its aliases expand to few values
    except yaml.YAMLError as e:  # a tag safe_load has no constructor for: nothing in a config runs code
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{source}{line}: not valid YAML: {getattr(e, 'problem', None) or e}"]) from None


def _index_lines(node: yaml.Node, key: tuple, source: str, where: dict, problems: list[str]) -> None:
    """Record ``file:line`` for every key path, and refuse duplicate keys (safe_load silently keeps the last), too
    deep a nesting and too many values (YAML aliases expanded)."""
    if len(key) > MAX_CONFIG_DEPTH or len(where) > MAX_CONFIG_VALUES:
        if not problems:
            too = "nested deeper than" if len(key) > MAX_CONFIG_DEPTH else "more values than"
            limit = MAX_CONFIG_DEPTH if len(key) > MAX_CONFIG_DEPTH else MAX_CONFIG_VALUES
            problems.append(f"{source}:{node.start_mark.line + 1} {'.'.join(key[:3])}: {too} {limit:,} "
                            "(YAML aliases expand: a pipeline definition needs few)")
        return
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


def located(where: dict, key: tuple, message: str) -> str:
    """``message`` about the key path ``key``, prefixed with its ``file:line`` from ``where``."""
    return f"{_locate(where, key)} {'.'.join(key)}: {message}".strip()


def _build(cls: type, data: Any, key: tuple, where: dict, problems: list[str]) -> Any:
    """Turn ``data`` into ``cls``; append every problem found to ``problems`` and return None if any."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(located(where, key, f"expected a mapping of keys, got {_kind(data)}"))
        return None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            hint = f"; known keys: {', '.join(fields)}"
            problems.append(located(where, (*key, str(name)), f"unknown key{hint}"))
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
            problems.append(located(where, sub, message))
            continue
        check = fields[name].metadata.get("check")
        if check and converted is not None and not check[0](converted):
            problems.append(located(where, sub, check[1].format(got=value)))
            continue
        kwargs[name] = _expand_home(converted) if fields[name].metadata.get("path") else converted
    for name in fields:  # sections not given in the YAML still validate their defaults
        if name not in data and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = _build(hints[name], {}, (*key, name), where, problems)
    if len(problems) > before:
        return None
    try:
        return cls(**kwargs)
    except _FieldProblem as e:
        problems.append(located(where, (*key, *e.key.split(".")), e.message))
        return None


def _expand_home(value: Any) -> Any:
    if isinstance(value, tuple):
        return tuple(_expand_home(v) for v in value)
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else value


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
            if not math.isfinite(value):
                return False, None, f"must be a finite number, got {value}"
            return True, float(value), ""
        return False, None, f"expected a number, got {_kind(value)}"
    if hint is str:
        if isinstance(value, str):
            return True, value, ""
        return False, None, f"expected a string, got {_kind(value)}"
    raise TypeError(f"unsupported config field type {hint!r}")  # a programming error in this module
