"""Segment plans, shot boundaries and frame sampling, all from frame timestamps (PTS), so variable-frame-rate
files get true times."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from temporal.localize import multiscale_windows


@dataclass(frozen=True)
class Segment:
    segment_id: int  # position in the video's plan, from 0
    start_s: float  # segment start, seconds from the video's first frame
    end_s: float  # segment end (exclusive), seconds
    frame_indices: np.ndarray  # int64 [T]: decoded frames, in time order (may repeat in very short segments)
    frame_times_s: np.ndarray  # float64 [T]: their presentation times, seconds


def plan_windows(start_s: float, end_s: float, *, window_s: float, stride_s: float,
                 min_segment_s: float) -> list[tuple[float, float]]:
    """Windows over ``[start_s, end_s)``; the last partial window is kept when at least ``min_segment_s`` long."""
    if end_s - start_s <= window_s:
        return [(start_s, end_s)]
    spans, start = [], start_s
    while start < end_s - 1e-9:
        end = min(start + window_s, end_s)
        if end - start >= min_segment_s or not spans:
            spans.append((start, end))
        if end >= end_s:
            break
        start += stride_s
    return spans


def shot_boundaries(histograms: np.ndarray, times_s: np.ndarray, *, threshold: float, min_shot_s: float) -> list[float]:
    """Cut times where consecutive frames' colour histograms differ by more than ``threshold`` (half the L1
    distance of normalised histograms, 0..1), at least ``min_shot_s`` after the previous cut."""
    if len(histograms) < 2:
        return []
    dist = 0.5 * np.abs(np.diff(histograms, axis=0)).sum(axis=1)  # [N-1]: frame i -> i+1
    cuts, last = [], times_s[0]
    for i in np.flatnonzero(dist > threshold):
        t = times_s[i + 1]
        if t - last >= min_shot_s:
            cuts.append(float(t))
            last = t
    return cuts


def frame_histograms(frames: np.ndarray, bins: int = 16) -> np.ndarray:
    """uint8 ``[N,H,W,3]`` -> per-frame normalised colour histograms ``[N, 3*bins]``."""
    q = (frames.astype(np.int32) * bins) >> 8  # [N, H, W, 3] in 0..bins-1
    flat = q.reshape(len(frames), -1, 3) + np.arange(3) * bins  # per channel, its own bin range
    counts = np.stack([np.bincount(f.ravel(), minlength=3 * bins) for f in flat]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def plan_spans(end_s: float, *, mode: str, window_s: float, stride_s: float, min_segment_s: float,
               cuts: list[float] = (), scales_s: tuple[float, ...] = ()) -> list[tuple[float, float]]:
    """``whole``: one span; ``window``: windows over the video (at every scale of ``scales_s`` with half-window
    strides, when given: for localisation); ``shots``: shots, long ones split into windows."""
    if mode == "whole":
        return [(0.0, end_s)]
    if mode == "window" and scales_s:
        return [(a, b) for a, b, _ in multiscale_windows(end_s, tuple(scales_s))]
    if mode == "window":
        return plan_windows(0.0, end_s, window_s=window_s, stride_s=stride_s, min_segment_s=min_segment_s)
    edges = [0.0, *[c for c in cuts if 0 < c < end_s], end_s]
    return [w for a, b in zip(edges, edges[1:])
            for w in plan_windows(a, b, window_s=window_s, stride_s=stride_s, min_segment_s=min_segment_s)]


def _on_screen(frame_times_s: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Index of the frame on screen at each target time."""
    index = np.searchsorted(frame_times_s, targets, side="right") - 1
    return np.clip(index, 0, len(frame_times_s) - 1).astype(np.int64)


def sample_uniform(frame_times_s: np.ndarray, start_s: float, end_s: float, frames: int) -> np.ndarray:
    """Indices of ``frames`` frames at the centres of ``frames`` equal parts of ``[start_s, end_s)``."""
    return _on_screen(frame_times_s, start_s + (np.arange(frames) + 0.5) * (end_s - start_s) / frames)


def sample_fps(frame_times_s: np.ndarray, start_s: float, end_s: float, target_fps: float,
               max_frames: int) -> np.ndarray:
    """Frames at ``target_fps`` over the segment (at least one), thinned evenly to ``max_frames``."""
    n = max(1, int((end_s - start_s) * target_fps))
    if n > max_frames:
        return sample_uniform(frame_times_s, start_s, end_s, max_frames)
    return _on_screen(frame_times_s, start_s + (np.arange(n) + 0.5) / target_fps)


def sample_tsn(frame_times_s: np.ndarray, start_s: float, end_s: float, frames: int,
               rng: np.random.Generator) -> np.ndarray:
    """TSN: one random time in each of ``frames`` equal chunks (training-time augmentation)."""
    return _on_screen(frame_times_s, start_s + (np.arange(frames) + rng.random(frames)) * (end_s - start_s) / frames)


def plan_segments(frame_times_s: np.ndarray, end_s: float, *, mode: str, window_s: float, stride_s: float,
                  min_segment_s: float, strategy: str = "uniform", frames: int = 8, target_fps: float = 2.0,
                  max_frames: int = 32, seed: int = 0, key: str = "", cuts: list[float] = (),
                  scales_s: tuple[float, ...] = ()) -> list[Segment]:
    """Frame presentation times (relative to the first frame) -> the video's segments with sampled frames, only
    where frames are: a span with no frame in it (a gap in the timestamps) is no segment, so a file that declares
    hours around three frames costs three frames. ``tsn`` draws are deterministic per (seed, key, segment)."""
    segments = []
    spans = plan_spans(end_s, mode=mode, window_s=window_s, stride_s=stride_s, min_segment_s=min_segment_s, cuts=cuts,
                       scales_s=scales_s)
    starts, ends = (np.searchsorted(frame_times_s, [s[k] for s in spans]) for k in (0, 1))
    for i, (start, end) in enumerate(spans):
        if ends[i] == starts[i]:
            continue
        match strategy:
            case "uniform":
                index = sample_uniform(frame_times_s, start, end, frames)
            case "fps":
                index = sample_fps(frame_times_s, start, end, target_fps, max_frames)
            case "tsn":
                digest = hashlib.sha256(f"{seed}:{key}:{i}".encode()).digest()
                index = sample_tsn(frame_times_s, start, end, frames, np.random.default_rng(list(digest[:8])))
            case _:
                raise ValueError(f"unknown sampling strategy {strategy!r}")
        segments.append(Segment(i, start, end, index, frame_times_s[index]))
    return segments
