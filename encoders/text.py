"""Text side: label vocabularies, prompt-ensembled label embeddings (cached), and zero-shot tag scores."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F


class VocabularyError(ValueError):
    """A label file problem; the message names the file and line."""


def load_vocabulary(path: str | Path) -> list[str]:
    """One label per line; blank lines and ``#`` comments are skipped; a repeated label is an error."""
    labels: dict[str, int] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        label = raw.split("#", 1)[0].strip()
        if not label:
            continue
        if label in labels:
            raise VocabularyError(f"{path}:{number}: label {label!r} repeats line {labels[label]}")
        labels[label] = number
    if not labels:
        raise VocabularyError(f"{path}: no labels (one label per line)")
    return list(labels)


_CACHE: dict[str, torch.Tensor] = {}


def label_embeddings(encoder, labels: list[str], templates: tuple[str, ...]) -> torch.Tensor:
    """``[L, D]``: per label, the mean of its L2-normalised template embeddings, renormalised; cached."""
    key = hashlib.sha256(json.dumps([encoder.name, list(templates), list(labels)]).encode()).hexdigest()
    if key not in _CACHE:
        per_template = [F.normalize(encoder.encode_text([t.format(label) for label in labels]), dim=-1)
                        for t in templates]
        _CACHE[key] = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    return _CACHE[key]


def tag_probabilities(embeddings: torch.Tensor, label_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Segment embeddings ``[B, D]`` (normalised) -> probabilities over the vocabulary ``[B, L]``."""
    return (logit_scale * embeddings @ label_emb.T).softmax(dim=-1)


def top_tags(probs: torch.Tensor, labels: list[str], k: int) -> list[list[dict]]:
    """``[B, L]`` -> per row the ``k`` best ``{label, score}``, best first."""
    scores, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[{"label": labels[i], "score": float(s)} for s, i in zip(row_s.tolist(), row_i.tolist())]
            for row_s, row_i in zip(scores, index)]
