"""Segment plans and frame sampling from frame timestamps (PTS), so variable frame rates get true times."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    segment_id: int  # position in the video's plan, from 0
    start_s: float  # segment start, seconds from the video's first frame
    end_s: float  # segment end (exclusive), seconds
    frame_indices: np.ndarray  # int64 [T]: decoded frames, in time order (may repeat in very short segments)
    frame_times_s: np.ndarray  # float64 [T]: their presentation times, seconds


def plan_windows(duration_s: float, *, mode: str, window_s: float, stride_s: float,
                 min_segment_s: float) -> list[tuple[float, float]]:
    """``(start_s, end_s)`` of each segment; the last partial window is kept when at least ``min_segment_s``."""
    if mode == "whole" or duration_s <= window_s:
        return [(0.0, duration_s)]
    spans, start = [], 0.0
    while start < duration_s - 1e-9:
        end = min(start + window_s, duration_s)
        if end - start >= min_segment_s or not spans:
            spans.append((start, end))
        if end >= duration_s:
            break
        start += stride_s
    return spans


def sample_uniform(frame_times_s: np.ndarray, start_s: float, end_s: float, frames: int) -> np.ndarray:
    """Indices of ``frames`` frames at the centres of ``frames`` equal parts of ``[start_s, end_s)``."""
    targets = start_s + (np.arange(frames) + 0.5) * (end_s - start_s) / frames
    index = np.searchsorted(frame_times_s, targets, side="right") - 1  # the frame on screen at each target time
    return np.clip(index, 0, len(frame_times_s) - 1).astype(np.int64)


def plan_segments(frame_times_s: np.ndarray, duration_s: float, *, mode: str, window_s: float, stride_s: float,
                  min_segment_s: float, frames: int) -> list[Segment]:
    """Frame presentation times (relative to the first frame) -> the video's segments with sampled frames."""
    segments = []
    for i, (start, end) in enumerate(plan_windows(duration_s, mode=mode, window_s=window_s, stride_s=stride_s,
                                                  min_segment_s=min_segment_s)):
        index = sample_uniform(frame_times_s, start, end, frames)
        segments.append(Segment(i, start, end, index, frame_times_s[index]))
    return segments
