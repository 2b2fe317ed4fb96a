"""The one model a pipeline spec becomes: image-text encoder + hierarchical tower (+ its trained view fusion) +
temporal pooler (+ its trained head) + the text side (vocabulary embeddings and their calibration).

``run``, ``index``, ``search``, ``train``, ``eval``, ``demo`` and ``report`` all get their model from
:func:`create_model`, and the rules a config must follow about models are :func:`model_problems`, checked by the
config's validation on the driver and again here, so a library caller gets the same one-line error.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from temporal.checkpoint import CheckpointError, has_head, load_checkpoint, load_fusion, trained_view_levels
from temporal.pooling import AttentionPooling, build_pooler, mean_pool

from ._registry import create_encoder
from .detector import Owlv2Detector, create_detector
from .models import ImageTextEncoder, ModelLoadError, checkpoint_family, checkpoint_preprocess
from .preprocess import preprocess
from .text import (
    Calibration,
    Vocabulary,
    calibrate,
    label_embeddings,
    load_vocabulary,
    null_images,
    tag_probabilities,
    top_tags,
)
from .tower import HierarchicalTower, TowerOutput, pick_frames

if TYPE_CHECKING:  # the schema is data the factory reads; encoders never import the pipeline at run time
    from pipeline.config import ModelSpec, PipelineSpec, RaySpec

IMAGES_PER_CALL = {"cpu": 16, "cuda": 256}  # model.batch_size: null -> images per backbone call on each device


def worker_device(model: ModelSpec, ray: RaySpec) -> str:
    """``cuda`` or ``cpu``: the device the pipeline's encoder workers get (``model.device``; ``auto``: a GPU when
    Ray gives each encoder actor one: without, Ray hides the node's GPUs from the actor)."""
    return "cuda" if model.device == "cuda" or (model.device == "auto" and ray.gpus_per_actor > 0) else "cpu"


def images_per_call(model: ModelSpec, ray: RaySpec) -> int:
    """Images per backbone call: ``model.batch_size``, or the default of the device the encoder workers get."""
    return model.batch_size or IMAGES_PER_CALL[worker_device(model, ray)]


def model_problems(spec: PipelineSpec, *, training: bool = False) -> list[tuple[str, str]]:
    """``(key, message)`` for every rule about the model that ``spec`` breaks (reads the head's ``head.json``).
    ``training``: ``reeltag train`` trains the fusion and head, so it needs no checkpoint for them."""
    tower, temporal = spec.tower, spec.temporal
    if spec.regions.detector == "owlv2" and spec.tags.vocabulary is None:
        return [("regions.detector", "owlv2 finds boxes for the vocabulary's labels: set tags.vocabulary")]
    if spec.model.dtype == "int8" and worker_device(spec.model, spec.ray) == "cuda":
        return [("model.dtype", "int8 is dynamic quantisation for CPUs; on a GPU use bfloat16 (or auto)")]
    problems = _family_problems(spec, training=training)
    if problems:
        return problems
    if training and spec.train.backbone != "frozen" and tower.levels != (1,):
        return [("tower.levels", f"train.backbone: {spec.train.backbone} trains on the whole frame only: set "
                                 "tower.levels: [1] (tiles and their fusion train with train.backbone: frozen)")]
    if temporal.checkpoint is not None:
        if not os.path.exists(temporal.checkpoint):  # a directory, or its head.safetensors
            return [("temporal.checkpoint", f"not found: {temporal.checkpoint}")]
        if not has_head(temporal.checkpoint):
            return [("temporal.checkpoint", f"no head.safetensors in {temporal.checkpoint}")]
        if temporal.pooling != "attention":
            return [("temporal.checkpoint", "a trained head needs temporal.pooling: attention")]
    if tower.fusion != "attention" or training:
        return []
    if temporal.checkpoint is None:
        return [("tower.fusion", "attention is trained with the temporal head: set temporal.checkpoint to one "
                                 "trained with this tower (`reeltag train` trains one)")]
    try:
        trained = trained_view_levels(temporal.checkpoint)
    except CheckpointError as e:
        return [("temporal.checkpoint", str(e))]
    if trained != tower.view_levels:
        found = "no view fusion" if trained is None else f"a fusion of levels {sorted(set(trained))}"
        return [("tower.fusion", f"attention needs a fusion trained for levels {list(tower.levels)} and "
                                 f"temporal.checkpoint has {found}: `reeltag train` with this tower "
                                 "(train.backbone: frozen) trains one")]
    return []


def _family_problems(spec: PipelineSpec, *, training: bool) -> list[tuple[str, str]]:
    """What a family cannot do. ``temporal.pooling: model`` is X-CLIP's own temporal model; X-CLIP's frames attend
    to each other in groups of the checkpoint's ``num_frames``, so a segment must have exactly that many and
    whole frames only (tiles are not frames of a video)."""
    m, s = spec.model, spec.sampling
    family, config = _checkpoint(m)
    if family is None:
        return []
    if spec.temporal.pooling == "model" and family != "xclip":
        return [("temporal.pooling", f"model uses the checkpoint's own temporal model, which only xclip has "
                                     f"(this checkpoint is {family}): use mean or attention")]
    if family != "xclip":
        return []
    frames = config.get("vision_config", {}).get("num_frames", 8)
    if spec.tower.levels != (1,):
        return [("tower.levels", "xclip embeds a segment's frames together (cross-frame attention): tiles are not "
                                 "frames of a video, set tower.levels: [1]")]
    if s.strategy == "fps" or s.frames != frames:
        return [("sampling.frames", f"xclip's checkpoint attends across exactly {frames} frames per segment: set "
                                    f"sampling.strategy: uniform (or tsn) and sampling.frames: {frames}")]
    if training and spec.train.backbone != "frozen":
        return [("train.backbone", "xclip trains reeltag's head on its frame features (train.backbone: frozen); "
                                   "fine-tuning X-CLIP itself is not supported")]
    return []


def _checkpoint(m: ModelSpec) -> tuple[str | None, dict]:
    """The checkpoint's family and config, or (None, {}) where it cannot be read (the load's own error says why)."""
    try:
        return checkpoint_family(m.family, m.pretrained, local_files_only=m.local_files_only)
    except ModelLoadError:
        return None, {}


@dataclass(frozen=True)
class SigmoidScore:
    """SigLIP's own probability that a label applies: ``sigmoid(scale * cos + bias)``, its learned bias included."""

    scale: float
    bias: float

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * cos + self.bias)


@dataclass
class Tagger:
    """Zero-shot tags: the vocabulary's prompt-ensembled embeddings, scored with the model's temperature, and a
    calibrated confidence comparable across labels."""

    vocab: Vocabulary
    label_emb: torch.Tensor  # [L, D] normalised
    calibration: Calibration | SigmoidScore  # cos -> confidence: calibrated (CLIP, ALIGN, ...) or the model's own
    logit_scale: float
    top_k: int

    def tags(self, emb: torch.Tensor) -> list[list[dict]]:
        """``[B, D]`` normalised segment (or tile) embeddings -> the ``top_k`` best tags of each."""
        probs = tag_probabilities(emb, self.label_emb, self.logit_scale)
        return top_tags(probs, self.vocab.labels, self.top_k, self.calibration(emb @ self.label_emb.T))

    def region_tags(self, out: TowerOutput) -> list[dict]:
        """The best label of each tile (levels >= 2), from its embedding averaged over the fine frames."""
        if out.regions.shape[1] < 2:
            return []
        tiles = F.normalize(out.regions[:, 1:].mean(0), dim=-1)  # [V', D]
        return [{**best[0], "box": [float(x) for x in box]} for best, box in zip(self.tags(tiles), out.boxes[1:])]


class VideoTextModel(nn.Module):
    """Segments' frames -> segment embeddings ``[B, D]`` in the joint space (and tags); texts -> embeddings."""

    def __init__(self, encoder: ImageTextEncoder, tower: HierarchicalTower, pooler: AttentionPooling | None,
                 tagger: Tagger | None = None, *, model_pooling: bool = False, detector: Owlv2Detector | None = None,
                 detector_frames: str | int = "middle"):
        super().__init__()
        self.encoder, self.tower, self.pooler, self.tagger = encoder, tower, pooler, tagger
        self.model_pooling = model_pooling  # temporal.pooling: model (the encoder's own temporal model: X-CLIP)
        self.detector, self.detector_frames = detector, detector_frames  # regions.detector: owlv2

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def pool(self, frames: torch.Tensor, times_s: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B,T,D]`` frame embeddings, times ``[B,T]`` -> ``[B,D]`` normalised segment embeddings."""
        return mean_pool(frames, mask) if self.pooler is None else self.pooler(frames, times_s, mask)

    @torch.inference_mode()
    def embed_segments(self, frames: list[torch.Tensor],
                       times_s: list[torch.Tensor]) -> tuple[torch.Tensor, list[TowerOutput]]:
        """Segments' uint8 frames ``[T_i,H_i,W_i,3]`` and times ``[T_i]`` -> ``[B,D]`` segment embeddings and each
        segment's tower output. All the segments' views share backbone calls of ``tower.batch_size`` images."""
        towers = self.tower.forward_batch(frames)
        if self.model_pooling:
            return F.normalize(self.encoder.pool_video(torch.stack([t.raw for t in towers])), dim=-1), towers
        lengths = [len(f) for f in frames]
        fused = nn.utils.rnn.pad_sequence([t.fused for t in towers], batch_first=True)  # [B, T, D]
        times = nn.utils.rnn.pad_sequence([torch.as_tensor(t, dtype=torch.float32) for t in times_s],
                                          batch_first=True)
        mask = torch.arange(fused.shape[1])[None, :] < torch.tensor(lengths)[:, None]  # [B, T]
        return self.pool(fused, times, None if all(n == fused.shape[1] for n in lengths) else mask), towers

    @torch.inference_mode()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Strings as written -> ``[L, D]`` normalised text embeddings."""
        return F.normalize(self.encoder.encode_text(list(texts)), dim=-1)

    def embed_labels(self, vocab: Vocabulary, prompts: tuple[str, ...]) -> torch.Tensor:
        """``[L, D]``: each label prompt-ensembled (cached per model)."""
        return label_embeddings(self.encoder, vocab, prompts)

    def encode(self, frames: list[np.ndarray], times_s: list[np.ndarray]) -> list[dict]:
        """What the pipeline stores for each segment: ``embedding`` (float32), ``tags``, ``region_tags``."""
        with torch.inference_mode():
            emb, towers = self.embed_segments([torch.from_numpy(np.ascontiguousarray(f)) for f in frames], times_s)
            if self.tagger is None:
                return [{"embedding": e.numpy().astype(np.float32), "tags": [], "region_tags": []} for e in emb]
            tags = self.tagger.tags(emb)
            if self.detector is not None:
                regions = [self.detector.detect(torch.from_numpy(f[pick_frames(len(f), self.detector_frames).numpy()]))
                           for f in frames]
            else:
                regions = [self.tagger.region_tags(o) for o in towers]
            return [{"embedding": e.numpy().astype(np.float32), "tags": t, "region_tags": r}
                    for e, t, r in zip(emb, tags, regions)]


def _tagger(encoder: ImageTextEncoder, spec: PipelineSpec) -> Tagger | None:
    if spec.tags.vocabulary is None:
        return None
    vocab = load_vocabulary(spec.tags.vocabulary)
    label_emb = label_embeddings(encoder, vocab, spec.tags.prompts)
    if encoder.logit_bias is not None:
        return Tagger(vocab, label_emb, SigmoidScore(encoder.logit_scale, encoder.logit_bias), encoder.logit_scale,
                      spec.tags.top_k)
    reference = preprocess(null_images(encoder.preprocess_cfg.resolution), encoder.preprocess_cfg)
    reference = reference.repeat_interleave(encoder.frames_per_call, 0)  # X-CLIP: each image as a still video
    calibration = calibrate(F.normalize(encoder.forward_features(reference), dim=-1), label_emb)
    return Tagger(vocab, label_emb, calibration, encoder.logit_scale, spec.tags.top_k)


def create_model(spec: PipelineSpec, *, tagging: bool = True, video: bool = True, training: bool = False,
                 scratch: bool = False, dtype: str | None = None, device: str | None = None) -> VideoTextModel:
    """The model ``spec`` describes, with its trained fusion and head from ``temporal.checkpoint``.

    ``tagging``: with the vocabulary's embeddings; ``video``: False for the text side alone (a search query: no
    fusion or head is loaded); ``training``: fusion and head as training starts them (untrained; the training
    loop resumes them); ``scratch``: fresh weights in the checkpoint's architecture; ``dtype`` and ``device``
    override ``model.dtype`` and ``model.device``."""
    problems = model_problems(spec, training=training) if video else []
    if problems:
        raise CheckpointError("; ".join(f"{key}: {message}" for key, message in problems))
    m, t = spec.model, spec.tower
    encoder = create_encoder(m.family, pretrained=m.pretrained, local_files_only=m.local_files_only,
                             dtype=dtype or m.dtype, device=device or m.device, scratch=scratch)
    batch = m.batch_size or IMAGES_PER_CALL.get(encoder.device.type, IMAGES_PER_CALL["cpu"])
    batch = math.ceil(batch / encoder.frames_per_call) * encoder.frames_per_call  # X-CLIP: whole segments a call
    tower = HierarchicalTower(encoder, levels=t.levels, fusion=t.fusion, batch_size=batch, fine_frames=t.fine_frames,
                              overlap=t.tile_overlap)
    trained = video and spec.temporal.checkpoint is not None and not training
    if t.fusion == "attention" and trained:
        load_fusion(spec.temporal.checkpoint, tower.fuse)
    model_pooling = spec.temporal.pooling == "model"
    pooler = (load_checkpoint(spec.temporal.checkpoint)[0] if trained
              else None if model_pooling else build_pooler(spec.temporal.pooling, encoder.embed_dim))
    tagger = _tagger(encoder, spec) if tagging else None
    r = spec.regions
    detector = create_detector(r.pretrained, tagger.vocab.labels, local_files_only=m.local_files_only,
                               threshold=r.threshold, nms_iou=r.nms_iou, max_boxes=r.max_boxes) \
        if tagger is not None and video and r.detector == "owlv2" else None
    return VideoTextModel(encoder, tower, pooler, tagger, model_pooling=model_pooling, detector=detector,
                          detector_frames=r.frames).eval()


def decode_short_side(spec: PipelineSpec) -> int:
    """Short side frames are decoded at: ``decode.short_side_px``, else what the highest tower level needs (level L
    wants 2^(L-1) x the backbone's input side); read from the checkpoint's files without loading weights."""
    if spec.decode.short_side_px:
        return spec.decode.short_side_px
    cfg = checkpoint_preprocess(family=spec.model.family, pretrained=spec.model.pretrained,
                                local_files_only=spec.model.local_files_only)
    return max(cfg.level1_side, cfg.resolution * 2 ** (max(spec.tower.levels) - 1))


def segments_per_call(spec: PipelineSpec) -> int:
    """Segments the encode stage takes at a time: enough that their images fill a backbone call."""
    images = spec.sampling.frames if spec.sampling.strategy != "fps" else spec.sampling.max_frames
    return max(1, math.ceil(images_per_call(spec.model, spec.ray) / images))
