"""Evaluation: text->video retrieval (R@K, median rank), zero-shot top-1, tag mAP."""

from __future__ import annotations

import numpy as np


def retrieval(video: np.ndarray, text: np.ndarray, relevant: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """``video [N,D]``, ``text [Q,D]`` (normalised), ``relevant [Q,N]`` bool -> R@K and median rank of the
    first relevant clip per query (ranks from 1)."""
    order = np.argsort(-(text @ video.T), axis=1, kind="stable")  # [Q, N]
    hits = np.take_along_axis(relevant, order, axis=1)
    first = hits.argmax(axis=1) + 1  # rank of the first relevant clip
    out = {f"R@{k}": float((first <= k).mean()) for k in ks}
    out["median_rank"] = float(np.median(first))
    return out


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """``scores [N,L]``, true label index ``[N]`` -> accuracy of the arg-max."""
    return float((scores.argmax(axis=1) == labels).mean())


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one label: ``scores [N]`` ranked high to low against ``positive [N]`` bool."""
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


def mean_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """``scores [N,L]``, ``positive [N,L]`` -> mean AP over labels with at least one positive."""
    aps = [average_precision(scores[:, j], positive[:, j]) for j in range(scores.shape[1]) if positive[:, j].any()]
    return float(np.mean(aps)) if aps else float("nan")
