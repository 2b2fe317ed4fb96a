"""Stages: small classes that declare their resources, load weights in ``setup()`` inside the worker and
transform in ``__call__``. ``jobs/`` maps them onto Ray; :func:`run_sequential` runs them without Ray.

``encoders.video_text`` is imported where the encode stage needs it, not at the top: it loads torch, and the
decode workers and their decoder processes, which import this module, must not (190 MB and 2 s each)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
import pyarrow as pa

from ._isolate import IsolatedDecoder
from .config import PipelineSpec
from .decode import (
    DecodeError,
    check_limits,
    choose_backend,
    decode_size,
    error_reason,
    low_res_histograms,
    open_video,
    probe,
    video_id,
)
from .segments import plan_segments, shot_boundaries
from .sources import local_path
from .writer import STREAM_SCHEMA

if TYPE_CHECKING:
    from encoders.video_text import VideoTextModel


@dataclass(frozen=True)
class Resources:
    """What one instance of a stage reserves on a Ray node."""

    cpus: float = 1.0  # CPU cores
    gpus: float = 0.0  # GPUs (a fraction shares one)


def _row(kind: str, vid: str, uri: str, **fields) -> dict:
    row = {"kind": kind, "video_id": vid, "uri": uri, "segment_id": -1, "n_segments": 0, "start_s": 0.0,
           "end_s": 0.0, "frame_times_s": np.zeros(0), "frames": np.zeros((0, 1, 1, 3), np.uint8),
           "backend": "", "node": "", "stage": "", "error_type": "", "message": ""}
    row.update(fields)
    return row


def decode_rows(uri: str, spec: PipelineSpec, short_side: int) -> Iterator[dict]:
    """1 video -> its segment rows (frames ``[T,H,W,3]`` uint8), a chunk of segments decoded at a time, then one
    ``end`` row: the count, or the failure. Frames decoded before a failure are kept (a truncated file keeps its
    first part and records the truncation). Runs in the decoder process."""
    vid, count, backend, failure = video_id(uri), 0, "", {}
    try:
        with local_path(uri) as path:
            for row in _segment_rows(uri, path, vid, spec, short_side):
                backend = row["backend"]
                count += 1
                yield row
    except DecodeError as e:
        failure = {"stage": "decode", "error_type": e.error_type, "message": str(e)}
    except OSError as e:  # reading the file broke (a remote copy, a network mount): worth another run
        failure = {"stage": "decode", "error_type": "io_error", "message": error_reason(e)}
    except Exception as e:  # noqa: BLE001 - any decoder failure is this video's, never the job's
        failure = {"stage": "decode", "error_type": type(e).__name__, "message": error_reason(e)}
    yield _row("end", vid, uri, n_segments=count, backend=backend, **failure)


def _segment_rows(uri: str, path: str, vid: str, spec: PipelineSpec, short_side: int) -> Iterator[dict]:
    """The segment rows of the local file ``path`` (``uri`` names it in the output)."""
    info, index = probe(path)
    seg, smp, dec = spec.segments, spec.sampling, spec.decode
    check_limits(info, index, dec)
    cuts = []
    if seg.mode == "shots":
        hists = low_res_histograms(path, index, threads=dec.threads)
        cuts = shot_boundaries(hists, index.times_s[:len(hists)], threshold=seg.shot_threshold,
                               min_shot_s=seg.min_shot_s)
    plan = plan_segments(index.times_s, index.end_s, mode=seg.mode, window_s=seg.window_s, stride_s=spec.stride_s,
                         min_segment_s=seg.min_segment_s, strategy=smp.strategy, frames=smp.frames,
                         target_fps=smp.target_fps, max_frames=smp.max_frames, seed=smp.seed, key=vid, cuts=cuts,
                         scales_s=seg.scales_s if seg.localize else ())
    size = decode_size(info, short_side)
    needed = len(np.unique(np.concatenate([s.frame_indices for s in plan]))) / len(index.pts)
    backend = choose_backend(info, dec.backend, dec.exact, needed)
    reader = open_video(path, info, index, size, backend=backend, requested=dec.backend, threads=dec.threads,
                        exact=dec.exact)
    count = 0
    try:
        for first in range(0, len(plan), dec.chunk_segments):
            group = plan[first:first + dec.chunk_segments]
            needed = np.unique(np.concatenate([s.frame_indices for s in group]))
            frames = reader.read(needed)
            times = (reader.served_pts - index.pts[0]) * index.time_base  # true times, also when inexact
            for s in group:
                at = np.searchsorted(needed, s.frame_indices)
                yield _row("segment", vid, uri, segment_id=s.segment_id, start_s=s.start_s, end_s=s.end_s,
                           frame_times_s=times[at], frames=frames[at], backend=reader.name)
                count += 1
    finally:
        reader.close()
    if info.duration_s and index.end_s < info.duration_s - max(1.0, 0.05 * info.duration_s):
        raise DecodeError("truncated", f"the file holds {index.end_s:.1f} s of the {info.duration_s:.1f} s its "
                                       f"header declares (truncated); kept {count} segments")


_DECODERS: dict[tuple, IsolatedDecoder] = {}


def _ray_node() -> str:
    """The id of the Ray node this runs on; empty outside Ray (tests, the sequential runner)."""
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""


class DecodeStage:
    """1 video -> N segment rows + 1 ``end`` row, decoded in a child process (see ``_isolate``)."""

    def __init__(self, spec: PipelineSpec, *, short_side: int | None = None):
        from encoders.video_text import decode_short_side  # torch: on the driver only (see the module's doc)

        self.spec, self.short_side = spec, short_side or decode_short_side(spec)
        self.resources = Resources(cpus=spec.ray.decode_cpus or 1.0)  # null until fitted to a cluster
        self._decoder = None

    def setup(self) -> None:
        d = self.spec.decode
        key = (d.timeout_s, d.recycle_after, d.max_memory_mb)  # one decoder process per worker, reused
        if key not in _DECODERS:
            _DECODERS[key] = IsolatedDecoder(decode_rows, timeout_s=d.timeout_s, recycle_after=d.recycle_after,
                                            timeout_setting="decode.timeout_s", memory_mb=d.max_memory_mb)
        self._decoder = _DECODERS[key]

    def __call__(self, item: dict) -> Iterator[dict]:
        if self._decoder is None:
            self.setup()
        uri = item["uri"]
        vid = video_id(uri)

        def failed(error_type: str, message: str, count: int) -> dict:
            return _row("end", vid, uri, n_segments=count, stage="decode", error_type=error_type, message=message)

        for row in self._decoder.run(uri, self.spec, self.short_side, on_fail=failed):
            if row["kind"] == "end":
                row["node"] = _ray_node()
            yield row

    def __getstate__(self):  # the decoder process belongs to the worker that started it
        return {**self.__dict__, "_decoder": None}


class EncodeStage:
    """N segment rows -> N rows with a segment embedding, tags and region tags (``end`` rows pass through). The
    segments of a call share backbone calls: ``batch_size`` segments fill ``model.batch_size`` images."""

    def __init__(self, spec: PipelineSpec):
        from encoders.video_text import segments_per_call  # torch (see the module's doc)

        self.spec = spec
        self.resources = Resources(cpus=spec.ray.encoder_cpus or 1.0, gpus=spec.ray.gpus_per_actor)
        self.batch_size = segments_per_call(spec)  # segments per call
        self.model: VideoTextModel | None = None

    def setup(self) -> None:
        import torch

        from encoders.video_text import create_model  # torch (see the module's doc)

        torch.set_num_threads(self.spec.ray.threads_per_actor)
        self.model = create_model(self.spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        if self.model is None:
            self.setup()
        rows = [{k: batch[k][i] for k in STREAM_SCHEMA.names if k in batch} for i in range(len(batch["kind"]))]
        todo = [i for i, row in enumerate(rows) if row["kind"] == "segment"]
        for i, result in zip(todo, self._encode([batch["frames"][i] for i in todo],
                                                [rows[i]["frame_times_s"] for i in todo])):
            rows[i].update(result)
        return pa.Table.from_pylist(rows, schema=STREAM_SCHEMA)

    def _encode(self, frames: list[np.ndarray], times_s: list[np.ndarray]) -> list[dict]:
        """The segments together; when that fails, each alone, so only a segment that cannot be encoded is
        recorded as an error (per item, never per batch)."""
        if not frames:
            return []
        try:
            return self.model.encode(frames, times_s)
        except Exception as e:  # noqa: BLE001 - a segment that cannot be encoded is recorded, not fatal
            if len(frames) == 1:
                return [{"stage": "encode", "error_type": type(e).__name__, "message": error_reason(e)}]
        return [result for f, t in zip(frames, times_s) for result in self._encode([f], [t])]


def run_sequential(spec: PipelineSpec, uris: Iterable[str], *, short_side: int | None = None) -> pa.Table:
    """Decode and encode without Ray (tests, debugging), in the encode stage's batches; returns the stream rows."""
    decode, encode = DecodeStage(spec, short_side=short_side), EncodeStage(spec)
    decode.setup()
    encode.setup()
    rows = [row for uri in uris for row in decode({"uri": uri})]
    tables = []
    for first in range(0, len(rows), encode.batch_size):
        chunk = rows[first:first + encode.batch_size]
        tables.append(encode({k: np.array([r[k] for r in chunk] + [None], dtype=object)[:-1] for k in chunk[0]}))
    return pa.concat_tables(tables)
