"""One contrastive training loop, with a task per kind of training (open_clip_train's pattern).

:class:`HeadTask` trains the temporal head (and the tower's view fusion) on frame embeddings that a frozen
backbone computed once; :class:`ModelTask` trains the whole image-text model and the head end to end from pixels.
:func:`fit` owns what they share: the optimizer, the per-epoch shuffle seeded by (seed, epoch) so a run resumed
after a crash continues exactly, the learning-rate schedule, logging, and a checkpoint after every epoch (with the
optimizer's moments until the last). Both tasks optimise the same objective for ``train.loss``: each clip against
every distinct training text (up to :data:`MAX_TEXT_BANK`, else the batch's own texts), ALIGN's label smoothing for
``align`` (:func:`~temporal.losses.vocabulary_loss`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange

from .augment import augment_clips
from .checkpoint import (
    META_FILE,
    CheckpointError,
    HeadShape,
    load_checkpoint,
    load_fusion,
    read_meta,
    recover_checkpoint,
    restore_optimizer,
    save_checkpoint,
    swap_in,
)
from .losses import ALIGN_SMOOTHING, vocabulary_loss
from .pooling import AttentionPooling, mean_pool

if TYPE_CHECKING:  # the hyperparameters are defined once, in the config schema
    from pipeline.config import TrainSpec

class ImageEncoder(Protocol):
    """What training needs of an image-text encoder (``encoders.models.ImageTextEncoder`` is one)."""

    model: torch.nn.Module  # the transformers model, with a ``logit_scale`` parameter
    preprocess_cfg: object  # the checkpoint's preprocessing (``resolution``: the input side)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def embed_images(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def embed_texts(self, texts: list[str]) -> torch.Tensor: ...
    def save_pretrained(self, directory: Path) -> None: ...


MAX_TEXT_BANK = 1024  # contrast with all distinct texts up to this many, else with each batch's own texts


@dataclass
class ClipEmbeddings:
    """What the head trains on: per clip, frame embeddings, their times, a mask, and its text's index; for a
    learned view fusion (``tower.fusion: attention``) also every view of every frame."""

    frames: torch.Tensor  # [N, T, D] L2-normalised frame embeddings (the whole frame's, when there are views)
    times_s: torch.Tensor  # [N, T] seconds
    mask: torch.Tensor  # [N, T] bool, True for real frames
    text: torch.Tensor  # [Q, D] L2-normalised embeddings of the distinct texts
    groups: torch.Tensor  # [N] int: index of each clip's text in ``text``
    views: torch.Tensor | None = None  # [N, T, V, D] L2-normalised views of each frame, the whole frame first
    view_levels: torch.Tensor | None = None  # [V] tower level of each view (1, then 2s, then 3s)

    def fused(self, fuse: torch.nn.Module | None) -> ClipEmbeddings:
        """The same clips with each frame's views fused by ``fuse`` (no gradient); itself without a fusion."""
        if fuse is None:
            return self
        with torch.no_grad():
            return replace(self, frames=fuse_views(fuse, self.views, self.view_levels))


@dataclass
class ClipPixels:
    """What end-to-end training reads: per clip, the backbone's view of each sampled frame (after the checkpoint's
    resize/crop, before normalisation), their times, a mask, and the index of the clip's text."""

    pixels: torch.Tensor  # [N, T, 3, R, R] uint8
    times_s: torch.Tensor  # [N, T] seconds
    mask: torch.Tensor  # [N, T] bool, True for real frames
    groups: torch.Tensor  # [N] int: index of the clip's text

    def subset(self, index: torch.Tensor) -> ClipPixels:
        return ClipPixels(self.pixels[index], self.times_s[index], self.mask[index], self.groups[index])

    def frame_embeddings(self, encoder: ImageEncoder, batch_size: int = 64) -> torch.Tensor:
        """``[N, T, D]`` L2-normalised frame embeddings under ``encoder`` as it is now."""
        flat = rearrange(self.pixels, "n t c h w -> (n t) c h w")
        with torch.inference_mode():
            emb = torch.cat([encoder.forward_features(encoder.normalise(chunk.float()))
                             for chunk in flat.split(batch_size * self.pixels.shape[1])])
        return rearrange(F.normalize(emb, dim=-1), "(n t) d -> n t d", n=len(self.pixels))


def fuse_views(fuse: torch.nn.Module, views: torch.Tensor, view_levels: torch.Tensor) -> torch.Tensor:
    """``[B,T,V,D]`` views -> ``[B,T,D]`` fused frame embeddings (the tower's fusion, one frame at a time)."""
    fused = fuse(rearrange(views, "b t v d -> (b t) v d"), view_levels)
    return rearrange(fused, "(b t) d -> b t d", b=len(views))


def contrastive_loss(video: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor, groups: torch.Tensor, *,
                     kind: str) -> torch.Tensor:
    """``train.loss`` for clips ``[B, D]`` whose texts are ``groups`` in the text bank ``texts [Q, D]``."""
    return vocabulary_loss(video, texts, scale, groups, smoothing=ALIGN_SMOOTHING if kind == "align" else 0.0)


def text_bank(groups: torch.Tensor, n_texts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of the texts to contrast with, the batch's groups renumbered into them)."""
    if n_texts <= MAX_TEXT_BANK:  # a closed vocabulary (SynthActions' 72 captions): every text at every step
        return torch.arange(n_texts), groups
    return groups.unique(return_inverse=True)  # open captions: the batch's own texts, as CLIP


def job_of(settings: TrainSpec, data: dict | None = None) -> dict:
    """What a checkpoint records of the job that trained it: the hyperparameters and ``data`` (what the caller
    says identifies the clips and model: digests, names). A run resumes a checkpoint only of the same job."""
    hyper = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("manifest", "eval_manifest")}
    return {**hyper, **(data or {})}


def check_same_job(directory: Path, job: dict, epochs: int) -> None:
    """CheckpointError unless the checkpoint in ``directory`` is of ``job`` and can go on to ``epochs`` (more epochs
    is the same job, trained longer; fewer would train nothing and say it had)."""
    meta = read_meta(directory)
    changed = sorted(k for k in set(meta["settings"]) | set(job)
                     if k != "epochs" and meta["settings"].get(k) != job.get(k))
    if changed:
        raise CheckpointError(f"{directory} holds a checkpoint of another job ({', '.join(changed)} changed): "
                              "train it afresh with --restart, or set another output.dir")
    if meta["epoch"] > epochs:
        raise CheckpointError(f"{directory} has trained {meta['epoch']} epochs already, train.epochs asks for "
                              f"{epochs}: raise train.epochs to train on, or --restart")


class Task(Protocol):
    """One kind of training: it owns its parameters, its loss on a batch of clips, and its checkpoint."""

    clips: int  # training clips
    schedule: bool  # warm-up + cosine learning rate (True) or a constant one
    job: dict  # what identifies the job (job_of): saved with each checkpoint, compared when resuming

    def param_groups(self, settings: TrainSpec) -> list[dict]: ...
    def loss(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]: ...
    def train(self, mode: bool = True) -> object: ...
    def logit_scale(self) -> float: ...
    def load(self, directory: Path) -> tuple[dict, dict]: ...
    def save(self, directory: Path, epoch: int, optimizer: torch.optim.Optimizer | None) -> None: ...


class HeadTask:
    """The temporal head (and the tower's view fusion, when given) on frozen frame embeddings."""

    schedule = False

    def __init__(self, data: ClipEmbeddings, shape: HeadShape, settings: TrainSpec, *,
                 fuse: torch.nn.Module | None = None, init_logit_scale: float = math.log(1 / 0.07),
                 job: dict | None = None):
        self.data, self.shape, self.settings, self.fuse = data, shape, settings, fuse
        self.job = job_of(settings, job)
        self.head = shape.build()
        self.log_scale = torch.nn.Parameter(torch.tensor(init_logit_scale))
        self.clips = len(data.frames)

    def param_groups(self, settings: TrainSpec) -> list[dict]:
        trained = list(self.head.parameters()) + (list(self.fuse.parameters()) if self.fuse is not None else [])
        # the temperature moves 10x faster: it must grow well past its init when captions embed close together
        return [{"params": trained, "lr_scale": 1.0},
                {"params": [self.log_scale], "weight_decay": 0.0, "lr_scale": 10.0}]

    def loss(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        d = self.data
        frames = d.frames[index] if self.fuse is None else fuse_views(self.fuse, d.views[index], d.view_levels)
        video = self.head(frames, d.times_s[index], d.mask[index])
        bank, groups = text_bank(d.groups[index], len(d.text))
        scale = self.log_scale.exp().clamp(max=100.0)
        return contrastive_loss(video, d.text[bank], scale, groups, kind=self.settings.loss), {}

    def train(self, mode: bool = True) -> HeadTask:
        for module in (self.head, self.fuse):
            if module is not None:
                module.train(mode)
        return self

    def logit_scale(self) -> float:
        return float(self.log_scale.detach().exp())

    def load(self, directory: Path) -> tuple[dict, dict]:
        restored, scale, meta, opt = load_checkpoint(directory)
        self.head.load_state_dict(restored.state_dict())
        if self.fuse is not None:
            load_fusion(directory, self.fuse)
        with torch.no_grad():
            self.log_scale.copy_(scale)
        return meta, opt

    def save(self, directory: Path, epoch: int, optimizer: torch.optim.Optimizer | None) -> None:
        levels = None if self.fuse is None else self.data.view_levels.tolist()
        with _swapped(directory) as tmp:
            save_checkpoint(tmp, self.head, self.shape, self.log_scale, epoch=epoch, settings=self.job,
                            optimizer=optimizer, fuse=self.fuse, view_levels=levels)


class ModelTask:
    """The whole image-text model and the temporal head, end to end (pixels -> frames -> head <-> text). Its
    checkpoint is a complete model directory: the model's ``save_pretrained`` files plus the head, usable as
    ``model.pretrained`` and ``temporal.checkpoint`` at once (the caller loads ``encoder`` from it to resume).
    Augmentation: ``train.max_shift`` (:func:`shift_clips`); ``train.mean_loss`` adds the loss on mean-pooled
    frames. ``bf16``: the model and head run under bf16 autocast (weights, optimizer and the loss stay fp32), with
    eager attention while training: torch's CPU flash attention backward in bf16 took 3.5x its fp32 time, eager
    attention's bf16 matmuls are what make the step ~2x faster (README "The demo model")."""

    schedule = True

    def __init__(self, encoder: ImageEncoder, data: ClipPixels, texts: list[str], shape: HeadShape,
                 settings: TrainSpec, *, job: dict | None = None, head: AttentionPooling | None = None,
                 bf16: bool = False):
        self.encoder, self.data, self.texts, self.shape, self.settings = encoder, data, texts, shape, settings
        self.job = job_of(settings, job)
        self.head = shape.build() if head is None else head.train()  # head: a trained one to go on from
        self.clips = len(data.pixels)
        self.bf16, self.attention = bf16, encoder.model.config._attn_implementation  # what inference runs

    def param_groups(self, settings: TrainSpec) -> list[dict]:
        named = list(self.encoder.model.named_parameters())
        decay = [p for name, p in named if p.ndim >= 2 and "embedding" not in name]
        rest = [p for name, p in named if not (p.ndim >= 2 and "embedding" not in name) and name != "logit_scale"]
        return [{"params": decay + list(self.head.parameters()), "lr_scale": 1.0},
                {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
                {"params": [self.encoder.model.logit_scale], "weight_decay": 0.0, "lr_scale": 10.0}]

    def loss(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        d, s, enc = self.data, self.settings, self.encoder
        pixels = shift_clips(d.pixels[index], round(s.max_shift * enc.preprocess_cfg.resolution), generator)
        if s.augment:
            pixels = augment_clips(pixels, s.augment, generator)
        x = enc.normalise(rearrange(pixels, "b t c h w -> (b t) c h w").float())
        bank_ids, groups = text_bank(d.groups[index], len(self.texts))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            frames = rearrange(F.normalize(enc.embed_images(x).float(), dim=-1), "(b t) d -> b t d", b=len(index))
            video = self.head(frames, d.times_s[index], d.mask[index]).float()
            bank = F.normalize(enc.embed_texts([self.texts[i] for i in bank_ids.tolist()]).float(), dim=-1)
        scale = enc.model.logit_scale.exp().clamp(max=100.0)
        loss = contrastive_loss(video, bank, scale, groups, kind=s.loss)
        if not s.mean_loss:
            return loss, {}
        # what one frame shows goes into each frame's own embedding, not only into the head's residual
        static = contrastive_loss(mean_pool(frames, d.mask[index]), bank, scale, groups, kind=s.loss)
        return loss + s.mean_loss * static, {"mean_pooled_loss": float(static.detach())}

    def train(self, mode: bool = True) -> ModelTask:
        self.encoder.model.train(mode)
        if self.bf16:
            self.encoder.model.set_attn_implementation("eager" if mode else self.attention)
        self.head.train(mode)
        return self

    def logit_scale(self) -> float:
        return float(self.encoder.model.logit_scale.detach().exp())

    def load(self, directory: Path) -> tuple[dict, dict]:
        restored, _, meta, opt = load_checkpoint(directory)
        self.head.load_state_dict(restored.state_dict())
        return meta, opt

    def save(self, directory: Path, epoch: int, optimizer: torch.optim.Optimizer | None) -> None:
        with _swapped(directory) as tmp:
            self.encoder.save_pretrained(tmp)
            save_checkpoint(tmp, self.head, self.shape, self.encoder.model.logit_scale, epoch=epoch,
                            settings=self.job, optimizer=optimizer)


@contextmanager
def _swapped(directory: Path) -> Iterator[Path]:
    """A fresh directory to write a whole checkpoint into, swapped in for ``directory`` when the block ends: a
    crash anywhere leaves the previous epoch's checkpoint whole (weights and meta of one epoch, never mixed)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    swap_in(tmp, directory)


def learning_rate(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of the steps, then a cosine decay to zero."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def shift_clips(pixels: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each clip ``[B,T,3,R,R]`` by a random offset of up to ``max_shift`` pixels per axis, the same for
    all its frames (so motion, colour and shape are kept); the border is extended from the edge pixels."""
    if max_shift <= 0:
        return pixels
    b, r = len(pixels), pixels.shape[-1]
    flat = rearrange(pixels, "b t c h w -> (b t) c h w").float()
    padded = rearrange(F.pad(flat, (max_shift,) * 4, mode="replicate"), "(b t) c h w -> b t c h w", b=b)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=generator).tolist()
    return torch.stack([padded[i, ..., y:y + r, x:x + r] for i, (y, x) in enumerate(zip(dy, dx))]).to(pixels.dtype)


def _epoch(task: Task, optimizer: torch.optim.Optimizer, settings: TrainSpec, epoch: int) -> dict[str, float]:
    """One pass over the clips in the epoch's seeded order; the mean of each logged term per clip."""
    n, batch = task.clips, settings.batch_size
    steps = math.ceil(n / batch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
    augment = torch.Generator().manual_seed(settings.seed * 100_019 + epoch)
    totals: dict[str, float] = defaultdict(float)
    for step, first in enumerate(range(0, n, batch)):
        if task.schedule:
            lr = learning_rate(epoch * steps + step, settings.epochs * steps, settings.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
        index = order[first:first + batch]
        loss, terms = task.loss(index, augment)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for key, value in {"loss": float(loss.detach()), **terms}.items():
            totals[key] += value * len(index)
    return {key: round(total / n, 5) for key, total in totals.items()}


def fit(task: Task, settings: TrainSpec, *, checkpoint_dir: str | Path, log: Callable[[dict], None] = print,
        evaluate: Callable[[], dict] | None = None) -> Task:
    """Train ``task`` (or resume it, if ``checkpoint_dir`` holds its checkpoint) for ``settings.epochs`` epochs;
    a checkpoint after every epoch, with the optimizer's moments until the last."""
    checkpoint_dir = recover_checkpoint(checkpoint_dir)
    groups = task.param_groups(settings)
    for group in groups:
        group["lr"] = settings.lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    start = 0
    if (checkpoint_dir / META_FILE).exists():
        check_same_job(checkpoint_dir, task.job, settings.epochs)
        meta, opt = task.load(checkpoint_dir)
        restore_optimizer(optimizer, meta, opt)
        start = meta["epoch"]
        log({"resumed_from_epoch": start})
    for epoch in range(start, settings.epochs):
        task.train(True)
        terms = _epoch(task, optimizer, settings, epoch)
        task.train(False)
        record = {"epoch": epoch + 1, "loss": terms.pop("loss"), "logit_scale": round(task.logit_scale(), 3), **terms}
        if evaluate is not None:
            record.update(evaluate())
        log(record)
        task.save(checkpoint_dir, epoch + 1, optimizer if epoch + 1 < settings.epochs else None)
    return task.train(False)


@torch.no_grad()
def embed_clips(head: AttentionPooling | None, data: ClipEmbeddings) -> torch.Tensor:
    """``[N, D]`` normalised clip embeddings: the head, or mean pooling when ``head`` is None."""
    if head is None:
        return mean_pool(data.frames, data.mask)
    return F.normalize(head(data.frames, data.times_s, data.mask), dim=-1)
