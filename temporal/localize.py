"""Temporal localisation: multi-scale window scores -> action segments ``(start_s, end_s, score)``."""

from __future__ import annotations

import numpy as np


def multiscale_windows(duration_s: float, scales_s: tuple[float, ...]) -> list[tuple[float, float, float]]:
    """``(start_s, end_s, scale_s)`` windows at each scale with half-window stride, the last one flush with the end."""
    out = []
    for scale in scales_s:
        if scale >= duration_s:
            out.append((0.0, duration_s, scale))
            continue
        starts = np.arange(0.0, duration_s - scale + 1e-9, scale / 2)
        if duration_s - (starts[-1] + scale) > 1e-6:
            starts = np.append(starts, duration_s - scale)
        out += [(float(s), float(s + scale), scale) for s in starts]
    return out


def temporal_iou(a: tuple[float, float], b: np.ndarray) -> np.ndarray:
    """IoU of interval ``a`` with each row of ``b [K, 2]``."""
    inter = np.clip(np.minimum(a[1], b[:, 1]) - np.maximum(a[0], b[:, 0]), 0, None)
    union = (a[1] - a[0]) + (b[:, 1] - b[:, 0]) - inter
    return inter / np.maximum(union, 1e-9)


def nms(spans: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> list[int]:
    """Indices kept by greedy temporal non-maximum suppression, best first."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        best = order.pop(0)
        keep.append(best)
        if order:
            rest = np.array(order)
            order = [int(i) for i in rest[temporal_iou(tuple(spans[best]), spans[rest]) <= iou]]
    return keep


def localize(spans: np.ndarray, scores: np.ndarray, *, threshold: float, iou: float = 0.5,
             gap_s: float = 0.0) -> list[tuple[float, float, float]]:
    """Windows ``[K,2]`` with scores ``[K]`` -> action segments: windows at or above ``threshold``, temporal NMS,
    then kept segments that overlap or lie within ``gap_s`` merged (extent united, score the max); by start."""
    above = np.flatnonzero(scores >= threshold)
    if not len(above):
        return []
    kept = sorted((float(spans[i, 0]), float(spans[i, 1]), float(scores[i]))
                  for i in above[nms(spans[above], scores[above], iou)])
    merged = [list(kept[0])]
    for start, end, score in kept[1:]:
        if start <= merged[-1][1] + gap_s:
            merged[-1][1], merged[-1][2] = max(merged[-1][1], end), max(merged[-1][2], score)
        else:
            merged.append([start, end, score])
    return [tuple(m) for m in merged]


def localize_videos(windows: list[dict], *, threshold: float) -> list[dict]:
    """Window rows ``{video_id, uri, start_s, end_s, tags}`` (several scales) -> action rows ``{video_id, uri, label,
    start_s, end_s, score}``: per video and label, the windows whose tag confidence reaches ``threshold``, temporal
    NMS, merged into actions with their true extents."""
    by_video: dict[str, list[dict]] = {}
    for row in windows:
        by_video.setdefault(row["video_id"], []).append(row)
    actions = []
    for vid, rows in by_video.items():
        spans = np.array([[w["start_s"], w["end_s"]] for w in rows])
        for label in sorted({t["label"] for w in rows for t in w["tags"]}):
            scores = np.array([next((t["confidence"] for t in w["tags"] if t["label"] == label), 0.0) for w in rows])
            actions += [{"video_id": vid, "uri": rows[0]["uri"], "label": label, "start_s": start, "end_s": end,
                         "score": score} for start, end, score in localize(spans, scores, threshold=threshold)]
    return actions
