"""Video decoding: probe with PyAV, read only the sampled frames with Decord (PyAV as fallback), resized at
decode, and turn every failure into a readable reason instead of an exception that takes the job down."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np


class DecodeError(Exception):
    """A video that cannot be decoded; ``error_type`` is a short machine-readable reason."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class VideoInfo:
    width: int  # coded width, pixels
    height: int  # coded height, pixels
    codec: str  # FFmpeg codec name, e.g. h264
    container: str  # FFmpeg demuxer name, e.g. mov,mp4,m4a,3gp,3g2,mj2
    frames: int  # number of frames the container declares (0 when unknown)
    duration_s: float  # container duration, seconds (0 when unknown)


def video_id(uri: str) -> str:
    """A stable id: the file's stem plus a hash of its absolute URI (two ``clip.mp4`` in different folders differ)."""
    stem = os.path.splitext(os.path.basename(uri))[0][:48]
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


def probe(path: str) -> VideoInfo:
    """Read a video's stream facts with PyAV, or raise DecodeError with the reason."""
    import av

    if not os.path.exists(path):
        raise DecodeError("not_found", f"no such file: {path}")
    if os.path.getsize(path) == 0:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            return VideoInfo(stream.codec_context.width, stream.codec_context.height, stream.codec_context.name,
                             container.format.name, int(stream.frames or 0), duration)
    except av.error.FFmpegError as e:
        raise DecodeError("unreadable", f"not a readable video: {_ffmpeg_reason(e)}") from None


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def decode_size(info: VideoInfo, short_side: int) -> tuple[int, int]:
    """(width, height) with the short side at ``short_side`` and the aspect kept; even sizes for the scalers."""
    scale = short_side / min(info.width, info.height)
    return max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2)


class DecordReader:
    """Decord, the primary reader: frame timestamps from the index, ``get_batch`` of sorted indices."""

    name = "decord"

    def __init__(self, path: str, size: tuple[int, int], threads: int = 1):
        import decord

        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0], height=size[1], num_threads=threads)
        except decord.DECORDError as e:
            raise DecodeError("unreadable", f"decord cannot open the file: {str(e).splitlines()[0]}") from None
        if len(self._vr) == 0:
            raise DecodeError("no_frames", "the video stream has no frames")

    def frame_times(self) -> tuple[np.ndarray, float]:
        """Start time of every frame and the video's end time, seconds from the first frame."""
        stamps = self._vr.get_frame_timestamp(range(len(self._vr)))  # [N, 2] start, end
        first = stamps[0, 0]
        return stamps[:, 0] - first, float(stamps[-1, 1] - first)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]`` for sorted unique frame indices."""
        return self._vr.get_batch(list(map(int, indices))).asnumpy()

    def close(self) -> None:
        del self._vr


class PyAVReader:
    """PyAV: decodes forward through the file and keeps the requested frames (exact, no seeking)."""

    name = "pyav"

    def __init__(self, path: str, size: tuple[int, int], threads: int = 1):
        import av

        self._path, self._size, self._threads = path, size, threads
        self._container, self._frames, self._next = None, None, 0
        try:
            with av.open(path) as container:
                stream = container.streams.video[0]
                pts = [f.pts for f in container.demux(stream) if f.pts is not None and f.size]
        except (av.error.FFmpegError, IndexError) as e:
            raise DecodeError("unreadable", f"PyAV cannot read the file: {_ffmpeg_reason(e)}") from None
        if not pts:
            raise DecodeError("no_frames", "the video stream has no frames")
        pts = np.sort(np.asarray(pts, dtype=np.float64))
        self._time_base = float(stream.time_base)
        times = (pts - pts[0]) * self._time_base
        step = np.median(np.diff(times)) if len(times) > 1 else 0.04
        self._times, self._end = times, float(times[-1] + step)

    def frame_times(self) -> tuple[np.ndarray, float]:
        return self._times, self._end

    def read(self, indices: np.ndarray) -> np.ndarray:
        """Frames for sorted unique indices; successive calls continue forward through one decode pass."""
        out = []
        for index in indices:
            if self._frames is None or index < self._next:
                self._restart()
            frame = None
            while self._next <= index:
                frame = next(self._frames, None)
                if frame is None:
                    raise DecodeError("truncated", f"frame {int(index)} could not be decoded (truncated or corrupt)")
                self._next += 1
            out.append(frame.to_ndarray(width=self._size[0], height=self._size[1], format="rgb24"))
        return np.stack(out)

    def _restart(self) -> None:
        import av

        if self._container is not None:
            self._container.close()
        self._container = av.open(self._path)
        stream = self._container.streams.video[0]
        stream.thread_count = self._threads
        self._frames, self._next = self._container.decode(stream), 0

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None


def open_reader(path: str, backend: str, size: tuple[int, int], threads: int = 1):
    """A reader of ``backend`` (decord or pyav) for ``path``, decoding at ``size`` (width, height)."""
    return {"decord": DecordReader, "pyav": PyAVReader}[backend](path, size, threads)


def read_chunks(reader, segments: list, chunk: int = 16) -> Iterator[tuple[object, np.ndarray]]:
    """Yield ``(segment, frames [T,H,W,3])``, decoding ``chunk`` segments' frames at a time in one sorted pass."""
    for first in range(0, len(segments), chunk):
        group = segments[first:first + chunk]
        needed = np.unique(np.concatenate([s.frame_indices for s in group]))
        frames = reader.read(needed)
        for s in group:
            yield s, frames[np.searchsorted(needed, s.frame_indices)]
