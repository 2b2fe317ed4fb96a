"""Video decoding that can be trusted: a PyAV index of every frame's timestamp, then only the sampled frames,
resized while decoding, read by Decord where it is exact and by PyAV (keyframe seek + decode forward)
everywhere else. Every failure becomes a :class:`DecodeError` with a readable reason.

Measured here (tests/pipeline/test_decode_exact.py pins each): Decord 0.6.0 returns the requested frame on
H.264, VP9 and MJPEG, but frames a few positions late after HEVC keyframes and a whole GOP early on MPEG-4
Part 2 AVI with B-frames. VP8 is decoded exactly by Decord on our files, but was reported wrong on others, so
it goes to PyAV too, and so does any codec in MPEG-TS (Decord's frames there are not the stream's). ``auto``
therefore uses Decord only for the codecs in :data:`DECORD_EXACT_CODECS` outside
:data:`DECORD_INEXACT_CONTAINERS`, and only for dense reads: for sparse ones PyAV is faster
(benchmarks/decode_bench.py).

Every backend is a :class:`VideoReader`; :func:`open_video` is the one place a reader is opened, and the one
place ``auto`` falls back from Decord to PyAV (when Decord cannot open a file, or fails on a read).
"""

from __future__ import annotations

import abc
import functools
import hashlib
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    import av

    from .config import DecodeSpec

from .segments import frame_histograms, sample_uniform

DECORD_EXACT_CODECS = frozenset({"h264", "vp9", "mjpeg"})
# Containers Decord reads the wrong frames from whatever the codec (tests/pipeline/test_timelines.py): in MPEG-TS
# (broadcast, HLS, M2TS) its H.264 frame k is not the k-th frame from the stream's start.
DECORD_INEXACT_CONTAINERS = frozenset({"mpegts", "mpeg", "mpegvideo"})
_IMAGE_FORMATS = ("image2", "png_pipe", "jpeg_pipe", "webp_pipe", "bmp_pipe", "gif", "tiff_pipe")


class DecodeError(Exception):
    """A video that cannot be decoded; ``error_type`` is a short machine-readable reason."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


@dataclass(frozen=True)
class VideoInfo:
    width: int  # display width after rotation, pixels
    height: int  # display height after rotation, pixels
    codec: str  # FFmpeg codec name, e.g. h264
    container: str  # FFmpeg demuxer name, e.g. mov,mp4,m4a,3gp,3g2,mj2
    rotation: int  # counter-clockwise degrees the coded frames are turned for display (0, 90, 180, 270)
    duration_s: float  # duration the container declares, seconds (0 when it declares none)


@dataclass(frozen=True)
class FrameIndex:
    """Every frame's presentation timestamp, from one demux pass (no decoding)."""

    pts: np.ndarray  # int64 [N], sorted: frame k in presentation order has pts[k] (frames an edit list hides: none)
    keyframes: np.ndarray  # int64 [K], sorted pts of keyframes (where a decode can start; hidden ones too)
    time_base: float  # seconds per pts tick
    key_dts: np.ndarray | None = None  # int64 [K]: each keyframe's decode timestamp, what demuxers seek by

    @property
    def times_s(self) -> np.ndarray:
        """float64 [N]: seconds from the first frame."""
        return (self.pts - self.pts[0]) * self.time_base

    @property
    def end_s(self) -> float:
        """End of the last frame, seconds from the first frame."""
        step = np.median(np.diff(self.pts)) if len(self.pts) > 1 else 0
        return float((self.pts[-1] + step - self.pts[0]) * self.time_base) or float(self.time_base)

    def keyframe_before(self, pts: int) -> int:
        i = np.searchsorted(self.keyframes, pts, side="right") - 1
        return int(self.keyframes[max(i, 0)])

    def seek_point(self, key: int) -> int:
        """The timestamp to seek to for the keyframe whose pts is ``key``: its dts. MPEG-TS demuxers seek by dts,
        and a keyframe's pts lies after it when there are B-frames: seeking to the pts lands a GOP late."""
        if self.key_dts is None:
            return key
        return int(self.key_dts[np.searchsorted(self.keyframes, key)])


def video_id(uri: str) -> str:
    """A stable id: the file's stem plus a hash of its absolute URI (two ``clip.mp4`` in different folders differ)."""
    stem = os.path.splitext(os.path.basename(uri))[0][:48]
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:10]}"


def error_reason(e: Exception) -> str:
    """The last line of an exception's message (where native libraries put the reason), at most 500 characters."""
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:500]


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def probe(path: str) -> tuple[VideoInfo, FrameIndex]:
    """Stream facts and the frame index, with PyAV; raise DecodeError with the reason for anything not a video."""
    import av

    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise DecodeError("not_found", f"cannot open {path}: {e.strerror}") from None
    if stat.S_ISREG(mode) and os.path.getsize(path) == 0:
        raise DecodeError("empty_file", "the file is empty (0 bytes)")
    try:
        with open_container(path) as container:
            if not container.streams.video:
                kinds = sorted({s.type for s in container.streams}) or ["none"]
                raise DecodeError("no_video_stream", f"no video stream (streams: {', '.join(kinds)})")
            stream = container.streams.video[0]
            keys, pts = {}, []  # keyframe pts -> dts; pts of the frames shown
            for packet in container.demux(stream):
                at = packet.pts if packet.pts is not None else packet.dts
                if not packet.size or at is None:
                    continue
                if packet.is_keyframe:
                    keys[at] = packet.dts if packet.dts is not None else at
                if not packet.is_discard:  # an edit list (a cut with -c copy) hides the frames before its start
                    pts.append(at)
            if stream.codec_context is None:  # FFmpeg knows no decoder for what the stream header now says
                raise DecodeError("unreadable", "no decoder for the video stream (its header is damaged or its "
                                                "codec unknown)")
            if container.format.name in _IMAGE_FORMATS or (len(pts) == 1 and stream.codec_context.name in (
                    "png", "mjpeg", "webp", "bmp", "tiff")):
                raise DecodeError("still_image", f"a still image ({stream.codec_context.name}), not a video")
            if not pts:
                raise DecodeError("no_frames", "the video stream has no frames")
            container.seek(0)
            rotation = _rotation(container, stream)
            cc = stream.codec_context
            declared = float(stream.duration * stream.time_base) if stream.duration else (
                container.duration / 1e6 if container.duration else 0.0)
            width, height = (cc.height, cc.width) if rotation in (90, 270) else (cc.width, cc.height)
            info = VideoInfo(width, height, cc.name, container.format.name, rotation, declared)
            time_base = float(stream.time_base)  # read while the container is open: it is garbage after close
    except av.error.FFmpegError as e:
        raise DecodeError("unreadable", f"not a readable video: {_ffmpeg_reason(e)}") from None
    pts = np.unique(np.asarray(pts, dtype=np.int64))
    keys = keys or {int(pts[0]): int(pts[0])}
    order = sorted(keys)
    return info, FrameIndex(pts, np.asarray(order, np.int64), time_base, np.asarray([keys[k] for k in order], np.int64))


def open_container(path: str) -> av.container.InputContainer:
    """PyAV's container for reading ``path``. Metadata that is not UTF-8 (Latin-1 titles in older files, damage)
    is read with replacement characters: it is never why a video cannot be tagged."""
    import av

    return av.open(path, metadata_errors="replace")


def _rotation(container, stream) -> int:
    """Display rotation from the first decodable frame's display matrix (0 when there is none)."""
    try:
        frame = next(container.decode(stream), None)
    except Exception:  # noqa: BLE001 - a broken first frame is found again, with its reason, when reading
        return 0
    return int(round(getattr(frame, "rotation", 0) or 0)) % 360 if frame is not None else 0


def check_limits(info: VideoInfo, index: FrameIndex, limits: DecodeSpec) -> None:
    """DecodeError (``too_long``, ``too_large``, ``bad_aspect``) for a video past ``decode.max_*``: its work would
    be unbounded whatever it holds (durations and sizes come from the file, which may lie)."""
    if index.end_s > limits.max_duration_s:
        raise DecodeError("too_long", f"{index.end_s:,.0f} s from the first frame to the last: more than "
                                      f"decode.max_duration_s ({limits.max_duration_s:,.0f} s)")
    if info.width * info.height > limits.max_pixels:
        raise DecodeError("too_large", f"{info.width}x{info.height} pixels a frame: more than decode.max_pixels "
                                       f"({limits.max_pixels:,})")
    if max(info.width, info.height) > limits.max_aspect * min(info.width, info.height):
        raise DecodeError("bad_aspect", f"{info.width}x{info.height}: an aspect ratio past decode.max_aspect "
                                        f"({limits.max_aspect:g}:1)")


def decode_size(info: VideoInfo, short_side: int) -> tuple[int, int]:
    """(width, height) for display with the short side at ``short_side`` and the aspect kept; even sizes."""
    scale = short_side / min(info.width, info.height)
    return max(2, round(info.width * scale / 2) * 2), max(2, round(info.height * scale / 2) * 2)


SPARSE_FRACTION = 0.10  # below this share of a video's frames, PyAV's seek + skip-ahead beats Decord (benchmarks/)


def choose_backend(info: VideoInfo, requested: str, exact: bool, needed_fraction: float = 1.0) -> str:
    """``auto``: Decord for dense reads of the codecs it decodes exactly; PyAV for other codecs, for sparse reads
    (it skips non-reference frames on the way to a target: 1.3x faster than Decord there) and when inexact."""
    if requested != "auto":
        return requested
    dense = needed_fraction >= SPARSE_FRACTION
    trusted = info.codec in DECORD_EXACT_CODECS and info.container not in DECORD_INEXACT_CONTAINERS
    return "decord" if exact and dense and trusted else "pyav"


class VideoReader(abc.ABC):
    """Sampled frames of one video, decoded at a fixed display size (pytorchvideo's ``Video`` pattern)."""

    name: str  # the backend that decoded the last read: decord or pyav (recorded in each segment row)
    served_pts: np.ndarray  # int64 pts of the frames the last read() returned

    @abc.abstractmethod
    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]`` for sorted unique frame indices; DecodeError if they cannot be."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the decoder; the reader is not read again."""

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class DecordReader(VideoReader):
    """Decord: ``get_batch`` of sorted frame indices, resized while decoding (it applies rotation itself)."""

    name = "decord"

    def __init__(self, path: str, info: VideoInfo, index: FrameIndex, size: tuple[int, int], threads: int = 1):
        import decord

        try:
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), width=size[0], height=size[1], num_threads=threads)
        except decord.DECORDError as e:
            raise DecodeError("unreadable", f"decord cannot open the file: {str(e).splitlines()[0]}") from None
        if len(self._vr) != len(index.pts):  # then its frame k is not ours: do not guess
            raise DecodeError("index_mismatch", f"decord sees {len(self._vr)} frames, the demuxer {len(index.pts)}")
        self._index = index
        self.served_pts = np.zeros(0, np.int64)  # pts of the frames the last read() returned

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]`` for sorted unique frame indices."""
        import decord

        try:
            frames = self._vr.get_batch([int(i) for i in indices]).asnumpy()
        except decord.DECORDError as e:
            raise DecodeError("decord_failed", f"decord could not read frames: {error_reason(e)}") from None
        if frames.shape[-1] != 3:  # Decord 0.6.0 returns 4 channels at some output widths
            raise DecodeError("decord_bad_output", f"decord returned frames of shape {frames.shape}")
        self.served_pts = self._index.pts[indices]
        return frames

    def close(self) -> None:
        self._vr = None


class PyAVReader(VideoReader):
    """PyAV: seek to the keyframe before each wanted frame (when it lies ahead of the decoder) and decode
    forward to the frame's exact timestamp, skipping non-reference frames while the target is still far away
    (a target that gets skipped all the same is decoded again without skipping). ``exact=False`` is a coarse
    pass: FFmpeg skips B-frames and deblocking, and each sample takes the nearest decoded frame."""

    name = "pyav"

    def __init__(self, path: str, info: VideoInfo, index: FrameIndex, size: tuple[int, int], threads: int = 1,
                 exact: bool = True):
        self._path, self._info, self._index, self._threads, self._exact = path, info, index, threads, exact
        w, h = size
        self._coded_size = (h, w) if info.rotation in (90, 270) else (w, h)
        self._container = self._frames = None
        self._prev = self._held = None  # the decoder's last two frames: before and at/after the last target
        self.served_pts = np.zeros(0, np.int64)  # pts of the frames the last read() returned
        step = int(np.median(np.diff(index.pts))) if len(index.pts) > 1 else 1
        self._margin, self._skip = 16 * step, "DEFAULT"  # skip non-reference frames until 16 frames short of a target

    def read(self, indices: np.ndarray) -> np.ndarray:
        """uint8 ``[len(indices), H, W, 3]`` for sorted unique frame indices; ``served_pts`` says which frames
        they are (the requested ones when exact, the nearest decoded ones otherwise)."""
        frames = [self._frame_at(int(self._index.pts[i])) for i in indices]
        self.served_pts = np.array([f.pts for f in frames], dtype=np.int64)
        return np.stack([self._to_rgb(f) for f in frames])

    def _position(self) -> int | None:
        frame = self._held if self._held is not None else self._prev
        return None if frame is None else frame.pts

    def _frame_at(self, target: int, *, fast_forward: bool = True):
        key, here = self._index.keyframe_before(target), self._position()
        passed = self._held is not None and self._held.pts > target if self._exact else (
            self._prev is not None and self._prev.pts > target)
        if self._frames is None or passed or (here is not None and key > here):
            self._seek(key)  # behind us, or a keyframe ahead lets us skip decoding up to it
        while self._held is None or self._held.pts < target:
            if self._held is not None:
                self._prev = self._held
            if self._exact:  # far from the target, frames nothing refers to need not be decoded at all
                position = self._position()
                far = fast_forward and position is not None and target - position > self._margin
                self._set_skip("NONREF" if far else "DEFAULT")
            self._held = self._next_frame()
            if self._held is None:
                break
        if self._held is not None and self._held.pts == target:
            return self._held
        seconds = f"{(target - self._index.pts[0]) * self._index.time_base:.3f} s"
        if self._exact and fast_forward and self._held is not None:
            self._frames = None  # the target was skipped as non-reference after all: decode its GOP in full
            return self._frame_at(target, fast_forward=False)
        if self._exact or (self._held is None and self._prev is None):
            if self._held is None:
                raise DecodeError("truncated", f"no frame at {seconds}: the file ends early or is corrupt there")
            raise DecodeError("missing_frame", f"the frame at {seconds} did not decode")
        candidates = [f for f in (self._prev, self._held) if f is not None]
        return min(candidates, key=lambda f: abs(f.pts - target))  # nearest decoded frame

    def _set_skip(self, mode: str) -> None:
        if mode != self._skip:
            self._container.streams.video[0].codec_context.skip_frame = mode
            self._skip = mode

    def _next_frame(self):
        import av

        try:
            return next(self._frames, None)
        except av.error.FFmpegError as e:
            raise DecodeError("corrupt", f"decoding failed: {_ffmpeg_reason(e)}") from None

    def _seek(self, key: int) -> None:
        """Position the decoder at the keyframe whose pts is ``key`` (its first frame in ``_held``). Demuxers differ
        in what they seek by: MP4 lands on the keyframe at its pts, MPEG-TS by dts, a GOP late at the pts. So the
        pts first, then the dts if that overshot, then the start of the file, which is always exact."""
        if self._container is None:
            self._open()
        stream = self._container.streams.video[0]
        for target in dict.fromkeys([key, self._index.seek_point(key)]):
            try:
                self._container.seek(target, stream=stream, backward=True, any_frame=False)
            except Exception:  # noqa: BLE001 - a container that cannot seek there is read from its start
                break
            self._start_decoding()
            if self._held is not None and self._held.pts <= key:
                return
        self._container.close()
        self._open()
        self._start_decoding()

    def _open(self) -> None:

        self._container = open_container(self._path)
        stream = self._container.streams.video[0]
        stream.thread_count, stream.thread_type = self._threads, "AUTO"
        if not self._exact:  # the coarse pass: no B-frames, no deblocking
            stream.codec_context.options = {"skip_loop_filter": "all", "flags2": "+fast"}
            stream.codec_context.skip_frame = "BIDIR"
        self._skip = stream.codec_context.skip_frame

    def _start_decoding(self) -> None:
        self._frames, self._prev = self._container.decode(self._container.streams.video[0]), None
        self._held = self._next_frame()

    def _to_rgb(self, frame) -> np.ndarray:
        rgb = frame.to_ndarray(width=self._coded_size[0], height=self._coded_size[1], format="rgb24")
        return np.ascontiguousarray(np.rot90(rgb, self._info.rotation // 90)) if self._info.rotation else rgb

    def close(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = self._frames = None


class FallbackReader(VideoReader):
    """Reads with ``primary`` until a read fails, then with ``fallback()`` from that read on (``name`` says
    which served the last read). What ``auto`` does when it chose Decord and Decord fails mid-file."""

    def __init__(self, primary: VideoReader, fallback: Callable[[], VideoReader]):
        self._reader, self._fallback = primary, fallback

    @property
    def name(self) -> str:
        return self._reader.name

    @property
    def served_pts(self) -> np.ndarray:
        return self._reader.served_pts

    def read(self, indices: np.ndarray) -> np.ndarray:
        try:
            return self._reader.read(indices)
        except DecodeError:
            if self._fallback is None:
                raise
        self._reader.close()
        self._reader, self._fallback = self._fallback(), None
        return self._reader.read(indices)

    def close(self) -> None:
        self._reader.close()


def open_video(path: str, info: VideoInfo, index: FrameIndex, size: tuple[int, int], *, backend: str,
               requested: str = "auto", threads: int = 1, exact: bool = True) -> VideoReader:
    """A reader of ``backend`` (decord or pyav, from :func:`choose_backend`) for ``path``, decoding at ``size``
    (display width, height). When ``requested`` is ``auto`` and it chose Decord, PyAV takes over where Decord
    cannot open the file, or from the first read Decord fails on."""
    pyav = functools.partial(PyAVReader, path, info, index, size, threads, exact)
    if backend == "pyav":
        return pyav()
    if backend != "decord":
        raise ValueError(f"backend must be decord or pyav, got {backend!r}")
    if requested != "auto":
        return DecordReader(path, info, index, size, threads)
    try:
        return FallbackReader(DecordReader(path, info, index, size, threads), pyav)
    except DecodeError:
        return pyav()


def low_res_histograms(path: str, index: FrameIndex, *, threads: int = 1, side: int = 32) -> np.ndarray:
    """Colour histograms ``[N, 48]`` of every frame, decoded at ``side`` pixels (the cheap pass for shot cuts)."""
    import av

    hists = []
    with open_container(path) as container:
        stream = container.streams.video[0]
        stream.thread_count = threads
        try:
            for frame in container.decode(stream):
                hists.append(frame_histograms(frame.to_ndarray(width=side, height=side, format="rgb24")[None])[0])
        except av.error.FFmpegError:
            pass  # damage: cut detection uses the frames before it; reading them reports the damage
    return np.stack(hists[:len(index.pts)]) if hists else np.zeros((0, 48))


def decode_span(path: str, start_s: float, end_s: float | None, frames: int, short_side: int, *,
                backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """``frames`` frames spread uniformly over ``[start_s, end_s)`` of one video (a labelled clip): uint8
    ``[T,H,W,3]`` and their times in seconds from the video's first frame."""
    info, index = probe(path)
    times = index.times_s
    wanted = sample_uniform(times, start_s, index.end_s if end_s is None else min(end_s, index.end_s), frames)
    needed = np.unique(wanted)
    chosen = choose_backend(info, backend, True, len(needed) / len(times))
    with open_video(path, info, index, decode_size(info, short_side), backend=chosen, requested=backend) as reader:
        out = reader.read(needed)
    at = np.searchsorted(needed, wanted)
    return out[at], times[needed][at]
