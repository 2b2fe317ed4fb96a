"""Text side: label vocabularies, prompt-ensembled label embeddings (cached), and zero-shot tag scores."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .models import ImageTextEncoder


class VocabularyError(ValueError):
    """A label file problem; the message names the file and line."""


@dataclass(frozen=True)
class Vocabulary:
    labels: tuple[str, ...]  # in file order
    synonyms: dict[str, tuple[str, ...]] = field(default_factory=dict)  # extra phrasings, ensembled with the label
    parents: dict[str, str] = field(default_factory=dict)  # label -> broader label (a grouping)

    def phrasings(self, label: str) -> tuple[str, ...]:
        return (label, *self.synonyms.get(label, ()))


def load_vocabulary(path: str | Path) -> Vocabulary:
    """``.txt``: one label per line, blank lines and ``#`` comments skipped. ``.yaml``/``.yml``: a list of labels
    or of ``{label, synonyms, parent}``. A repeated label is an error naming both lines."""
    path = Path(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return _load_yaml(path)
    labels: dict[str, int] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        label = raw.split("#", 1)[0].strip()
        if not label:
            continue
        if label in labels:
            raise VocabularyError(f"{path}:{number}: label {label!r} repeats line {labels[label]}")
        labels[label] = number
    if not labels:
        raise VocabularyError(f"{path}: no labels (one label per line)")
    return Vocabulary(tuple(labels))


def _load_yaml(path: Path) -> Vocabulary:
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise VocabularyError(f"{path}:{mark.line + 1 if mark else '?'}: not valid YAML") from None
    if not isinstance(root, yaml.SequenceNode) or not root.value:
        raise VocabularyError(f"{path}:1: expected a list of labels or of {{label, synonyms, parent}} entries")
    seen: dict[str, int] = {}
    synonyms, parents = {}, {}
    for node in root.value:
        line = node.start_mark.line + 1
        entry = yaml.safe_load(yaml.serialize(node))
        entry = {"label": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or not isinstance(entry.get("label"), str) or not entry["label"].strip():
            raise VocabularyError(f"{path}:{line}: each entry needs a 'label' (a string)")
        unknown = set(entry) - {"label", "synonyms", "parent"}
        if unknown:
            raise VocabularyError(f"{path}:{line}: unknown key {sorted(unknown)[0]!r}; known: label, synonyms, parent")
        label = entry["label"].strip()
        if label in seen:
            raise VocabularyError(f"{path}:{line}: label {label!r} repeats line {seen[label]}")
        seen[label] = line
        syn = entry.get("synonyms") or []
        if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
            raise VocabularyError(f"{path}:{line}: synonyms of {label!r} must be a list of strings")
        if syn:
            synonyms[label] = tuple(s.strip() for s in syn)
        if entry.get("parent") is not None:
            parents[label] = str(entry["parent"])
    return Vocabulary(tuple(seen), synonyms, parents)


_CACHE: "weakref.WeakKeyDictionary[object, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def label_embeddings(encoder: ImageTextEncoder, vocab: Vocabulary, templates: tuple[str, ...]) -> torch.Tensor:
    """``[L, D]``: per label, the mean of the L2-normalised embeddings of every (template, phrasing) pair,
    renormalised; cached per encoder object by (templates, vocabulary), so an actor embeds its vocabulary once
    and a model loaded again (retrained in place, another dtype) never sees another model's embeddings."""
    key = hashlib.sha256(json.dumps([list(templates), list(vocab.labels),
                                     sorted(vocab.synonyms.items())]).encode()).hexdigest()
    cache = _CACHE.setdefault(encoder, {})
    if key not in cache:
        texts, owner = [], []
        for i, label in enumerate(vocab.labels):
            for phrase in vocab.phrasings(label):
                texts += [t.format(phrase) for t in templates]
                owner += [i] * len(templates)
        emb = F.normalize(torch.cat([encoder.encode_text(texts[i:i + 256]) for i in range(0, len(texts), 256)]), dim=-1)
        sums = torch.zeros(len(vocab.labels), emb.shape[1]).index_add_(0, torch.tensor(owner), emb)
        cache[key] = F.normalize(sums, dim=-1)
    return cache[key]


def null_images(resolution: int, n: int = 32) -> torch.Tensor:
    """Content-free uint8 images ``[n,R,R,3]`` (flat colours, gradients, noise): a fixed calibration reference."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, resolution, dtype=np.float32)
    images = []
    for i in range(n):
        match i % 4:
            case 0:
                img = np.broadcast_to(rng.uniform(0, 255, 3), (resolution, resolution, 3))
            case 1:
                img = np.broadcast_to(ramp[:, None, None] * rng.uniform(0.2, 1, 3), (resolution, resolution, 3))
            case 2:
                img = rng.uniform(0, 255, (resolution, resolution, 3))
            case _:
                img = np.broadcast_to(ramp[None, :, None] * rng.uniform(0.2, 1, 3), (resolution, resolution, 3))
        images.append(np.asarray(img, dtype=np.uint8))
    return torch.from_numpy(np.stack(images))


@dataclass(frozen=True)
class Calibration:
    """``confidence = sigmoid((cos - mean_l) / std_l - offset)``: each label's cosine, in standard deviations
    above what that label scores on content-free images, so one threshold means the same for every label."""

    mean: torch.Tensor  # [L]
    std: torch.Tensor  # [L]
    offset: float = 3.0  # z at which confidence is 0.5

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((cos - self.mean) / self.std - self.offset)


def calibrate(reference: torch.Tensor, label_emb: torch.Tensor) -> Calibration:
    """From normalised reference image embeddings ``[M,D]`` and label embeddings ``[L,D]``."""
    cos = reference @ label_emb.T  # [M, L]
    return Calibration(cos.mean(0), cos.std(0).clamp_min(1e-3))


def tag_probabilities(embeddings: torch.Tensor, label_emb: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Segment embeddings ``[B, D]`` (normalised) -> probabilities over the vocabulary ``[B, L]``."""
    return (logit_scale * embeddings @ label_emb.T).softmax(dim=-1)


def top_tags(probs: torch.Tensor, labels: tuple[str, ...], k: int,
             confidence: torch.Tensor | None = None) -> list[list[dict]]:
    """``[B, L]`` -> per row the ``k`` best ``{label, score, confidence}``, best first."""
    scores, index = probs.topk(min(k, probs.shape[-1]), dim=-1)
    conf = confidence if confidence is not None else torch.full_like(probs, float("nan"))
    return [[{"label": labels[i], "score": float(s), "confidence": float(conf[b, i])}
             for s, i in zip(row_s.tolist(), row_i.tolist())] for b, (row_s, row_i) in enumerate(zip(scores, index))]
