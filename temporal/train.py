"""Training the temporal head contrastively on cached frame embeddings, with safetensors checkpoints.

The backbone stays frozen, so every clip's frame embeddings are computed once (by the caller) and each epoch
only runs the small head. A checkpoint is ``head.safetensors`` (weights, the learned logit scale, the
optimizer's moments) plus ``head.json`` (shapes, epoch, settings): nothing in it is pickled or runs code.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .losses import ALIGN_SMOOTHING, LOSSES, vocabulary_loss
from .pooling import AttentionPooling, mean_pool

HEAD_FILE, META_FILE = "head.safetensors", "head.json"
MAX_TEXT_BANK = 1024  # end-to-end training contrasts with all distinct texts up to this many, else in-batch ones


@dataclass(frozen=True)
class HeadShape:
    dim: int  # embedding width
    heads: int = 4  # attention heads
    layers: int = 1  # transformer blocks over the frames
    queries: int = 1  # learned queries of the pooler

    def build(self) -> AttentionPooling:
        return AttentionPooling(self.dim, heads=self.heads, layers=self.layers, queries=self.queries)


@dataclass(frozen=True)
class TrainSettings:
    loss: str = "clip"  # clip | align
    max_shift: float = 0.0  # end-to-end training: shift each clip by up to this fraction of the input side
    mean_loss: float = 0.0  # end-to-end training: weight of the loss on the mean-pooled frames
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class ClipEmbeddings:
    """What the head trains on: per clip, frame embeddings, their times, a mask, and a text embedding; for a
    learned view fusion (``tower.fusion: attention``) also every view of every frame."""

    frames: torch.Tensor  # [N, T, D] L2-normalised frame embeddings (the whole frame's, when there are views)
    times_s: torch.Tensor  # [N, T] seconds
    mask: torch.Tensor  # [N, T] bool, True for real frames
    text: torch.Tensor  # [N, D] L2-normalised caption/label embeddings
    groups: torch.Tensor  # [N] int: clips with the same text share a group
    views: torch.Tensor | None = None  # [N, T, V, D] L2-normalised views of each frame, the whole frame first
    view_levels: torch.Tensor | None = None  # [V] tower level of each view (1, then 2s, then 3s)

    def fused(self, fuse: torch.nn.Module | None) -> "ClipEmbeddings":
        """The same clips with each frame's views fused by ``fuse`` (no gradient); itself without a fusion."""
        if fuse is None:
            return self
        with torch.no_grad():
            frames = fuse_views(fuse, self.views, self.view_levels)
        return replace(self, frames=frames)


def fuse_views(fuse: torch.nn.Module, views: torch.Tensor, view_levels: torch.Tensor) -> torch.Tensor:
    """``[B,T,V,D]`` views -> ``[B,T,D]`` fused frame embeddings (the tower's fusion, one frame at a time)."""
    return fuse(views.flatten(0, 1), view_levels).view(*views.shape[:2], -1)


def save_checkpoint(directory: str | Path, head: AttentionPooling, shape: HeadShape, log_scale: torch.Tensor, *,
                    epoch: int, settings: TrainSettings, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None, fuse: torch.nn.Module | None = None,
                    view_levels: torch.Tensor | None = None) -> Path:
    """Write ``head.safetensors`` and ``head.json`` into ``directory`` atomically (temporary name, rename); with
    ``fuse``, the trained view fusion too (``fuse.*`` tensors; ``view_levels`` in the meta)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    if fuse is not None:
        tensors.update({f"fuse.{k}": v.detach().contiguous() for k, v in fuse.state_dict().items()})
        extra = {**(extra or {}), "view_levels": view_levels.tolist()}
    tensors["log_logit_scale"] = log_scale.detach().reshape(1)  # the learned parameter; logit scale = exp
    groups = []
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            for name, value in values.items():
                tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).contiguous()
        groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    meta = {"shape": asdict(shape), "epoch": epoch, "settings": asdict(settings), "param_groups": groups,
            **(extra or {})}
    save_file(tensors, directory / f".{HEAD_FILE}.tmp")
    (directory / f".{META_FILE}.tmp").write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(directory / f".{HEAD_FILE}.tmp", directory / HEAD_FILE)
    os.replace(directory / f".{META_FILE}.tmp", directory / META_FILE)
    return directory


def load_checkpoint(path: str | Path) -> tuple[AttentionPooling, torch.Tensor, dict, dict]:
    """``path``: a checkpoint directory or its ``head.safetensors`` -> head, log of the logit scale, meta,
    optimizer tensors."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    meta = json.loads((directory / META_FILE).read_text())
    tensors = load_file(directory / HEAD_FILE)
    head = HeadShape(**meta["shape"]).build()
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return head.eval(), tensors["log_logit_scale"][0], meta, opt


def load_fusion(path: str | Path | None, fuse: torch.nn.Module) -> torch.nn.Module:
    """Load the view fusion trained with the head at ``path`` into ``fuse`` (which views it was trained on is
    ``view_levels`` in ``head.json``; the config checks them against the tower's)."""
    if path is None:
        raise ValueError("tower.fusion: attention needs temporal.checkpoint: a head trained with that fusion")
    directory = Path(path) if Path(path).is_dir() else Path(path).parent
    state = {k[5:]: v for k, v in load_file(directory / HEAD_FILE).items() if k.startswith("fuse.")}
    if not state:
        raise ValueError(f"{directory} has no trained view fusion (train one with tower.fusion: attention)")
    fuse.load_state_dict(state)
    return fuse.eval()


def _restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict, opt: dict) -> None:
    """Put the checkpoint's moments back; a finished run dropped them, and more epochs then start fresh ones."""
    if not meta["param_groups"]:
        return
    state: dict = {}
    for key, value in opt.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fit(data: ClipEmbeddings, shape: HeadShape, settings: TrainSettings, *, checkpoint_dir: str | Path,
        log: Callable[[dict], None] = print, evaluate: Callable[[AttentionPooling], dict] | None = None,
        init_logit_scale: float = math.log(1 / 0.07), fuse: torch.nn.Module | None = None) -> AttentionPooling:
    """Train (or resume, if ``checkpoint_dir`` holds a checkpoint) for ``settings.epochs`` epochs; checkpoint
    after every epoch, with the optimizer's moments until the last. Each epoch's shuffle is seeded by (seed,
    epoch), so a run resumed after a crash continues exactly.
    With ``fuse`` (the tower's view fusion, trained in place with the head) the head reads ``data.views`` fused."""
    checkpoint_dir = Path(checkpoint_dir)
    head = shape.build()
    log_scale = torch.nn.Parameter(torch.tensor(init_logit_scale))
    trained = list(head.parameters()) + (list(fuse.parameters()) if fuse is not None else [])
    # the temperature moves 10x faster: it must grow well past its init when captions embed close together
    optimizer = torch.optim.AdamW([{"params": trained},
                                   {"params": [log_scale], "weight_decay": 0.0, "lr": 10 * settings.lr}],
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    start = 0
    if (checkpoint_dir / HEAD_FILE).exists():
        restored, scale, meta, opt = load_checkpoint(checkpoint_dir)
        head.load_state_dict(restored.state_dict())
        if fuse is not None:
            load_fusion(checkpoint_dir, fuse)
        with torch.no_grad():
            log_scale.copy_(scale)
        _restore_optimizer(optimizer, meta, opt)
        start = meta["epoch"]
        log({"resumed_from_epoch": start})
    loss_fn = LOSSES[settings.loss]
    n = len(data.frames)
    for epoch in range(start, settings.epochs):
        head.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        total = 0.0
        for first in range(0, n, settings.batch_size):
            idx = order[first:first + settings.batch_size]
            frames = data.frames[idx] if fuse is None else fuse_views(fuse, data.views[idx], data.view_levels)
            video = head(frames, data.times_s[idx], data.mask[idx])
            loss = loss_fn(video, data.text[idx], log_scale.exp().clamp(max=100.0), data.groups[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        head.eval()
        record = {"epoch": epoch + 1, "loss": round(total / n, 5),
                  "logit_scale": round(float(log_scale.detach().exp()), 3)}
        if evaluate is not None:
            record.update(evaluate(head))
        log(record)
        save_checkpoint(checkpoint_dir, head, shape, log_scale, epoch=epoch + 1, settings=settings,
                        optimizer=optimizer if epoch + 1 < settings.epochs else None, fuse=fuse,
                        view_levels=data.view_levels)
    return head.eval()


@torch.no_grad()
def embed_clips(head: AttentionPooling | None, data: ClipEmbeddings) -> torch.Tensor:
    """``[N, D]`` normalised clip embeddings: the head, or mean pooling when ``head`` is None."""
    if head is None:
        return mean_pool(data.frames, data.mask)
    return F.normalize(head(data.frames, data.times_s, data.mask), dim=-1)


@dataclass
class ClipPixels:
    """What end-to-end training reads: per clip, the backbone's view of each sampled frame (after the
    checkpoint's resize/crop, before normalisation), their times, a mask, and the caption's index."""

    pixels: torch.Tensor  # [N, T, 3, R, R] uint8
    times_s: torch.Tensor  # [N, T] seconds
    mask: torch.Tensor  # [N, T] bool, True for real frames
    groups: torch.Tensor  # [N] int: index of the clip's text

    def subset(self, index: torch.Tensor) -> "ClipPixels":
        return ClipPixels(self.pixels[index], self.times_s[index], self.mask[index], self.groups[index])

    def frame_embeddings(self, encoder, batch_size: int = 64) -> torch.Tensor:
        """``[N, T, D]`` L2-normalised frame embeddings under the encoder as it is now."""
        from encoders.preprocess import normalise

        flat = self.pixels.flatten(0, 1)
        with torch.inference_mode():
            emb = torch.cat([encoder.forward_features(normalise(chunk.float(), encoder.preprocess_cfg))
                             for chunk in flat.split(batch_size * self.pixels.shape[1])])
        return F.normalize(emb, dim=-1).view(*self.pixels.shape[:2], -1)


def _learning_rate(step: int, total: int, peak: float) -> float:
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
    r = pixels.shape[-1]
    padded = F.pad(pixels.flatten(0, 1).float(), (max_shift,) * 4, mode="replicate").view(*pixels.shape[:3],
                                                                                        r + 2 * max_shift, -1)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, len(pixels)), generator=generator).tolist()
    return torch.stack([padded[b, ..., y:y + r, x:x + r] for b, (y, x) in enumerate(zip(dy, dx))]).to(pixels.dtype)


def _swap_in(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` with ``tmp``; a crash at any point leaves ``final`` or ``final.old`` whole, and
    :func:`recover_checkpoint` puts things right."""
    old = recover_checkpoint(final).with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: str | Path) -> Path:
    """Finish an interrupted :func:`_swap_in` (restore ``directory.old`` if ``directory`` is missing, else drop
    it); returns ``directory``."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        if directory.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, directory)
    return directory


def fit_model(encoder, data: ClipPixels, texts: list[str], shape: HeadShape, settings: TrainSettings, *,
              checkpoint_dir: str | Path, log: Callable[[dict], None] = print,
              evaluate: Callable[[object, AttentionPooling], dict] | None = None) -> AttentionPooling:
    """Train the whole image-text model and the temporal head end to end (pixels -> frames -> head <-> text).

    After every epoch ``checkpoint_dir`` becomes a complete checkpoint: the model's ``save_pretrained`` files
    plus ``head.safetensors``/``head.json`` (with the optimizer's moments, dropped after the last epoch), so
    ``model.pretrained`` and ``temporal.checkpoint`` can both point at it. A run finds its checkpoint and
    resumes (the caller loads the encoder from it). Learning rate: warm-up, then cosine to zero. Augmentation:
    ``settings.max_shift`` (:func:`shift_clips`). Loss:
    :func:`~temporal.losses.vocabulary_loss` against every distinct training text (a closed vocabulary such as
    SynthActions' 72 captions), or only the batch's texts when there are more than ``MAX_TEXT_BANK``."""
    from encoders.preprocess import normalise

    checkpoint_dir = recover_checkpoint(checkpoint_dir)
    model, cfg = encoder.model, encoder.preprocess_cfg
    head = shape.build()
    decay = [p for name, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in name]
    rest = [p for name, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in name)
            and name != "logit_scale"]
    # the temperature moves 10x faster, as for the head alone
    optimizer = torch.optim.AdamW([{"params": decay + list(head.parameters())},
                                   {"params": rest, "weight_decay": 0.0},
                                   {"params": [model.logit_scale], "weight_decay": 0.0}],
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    n, batch = len(data.pixels), settings.batch_size
    steps = math.ceil(n / batch)
    start = 0
    if (checkpoint_dir / META_FILE).exists():
        restored, _, meta, opt = load_checkpoint(checkpoint_dir)
        head.load_state_dict(restored.state_dict())
        start = meta["epoch"]
        _restore_optimizer(optimizer, meta, opt)
        log({"resumed_from_epoch": start})
    for epoch in range(start, settings.epochs):
        model.train()
        head.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed * 100_003 + epoch))
        shifts = torch.Generator().manual_seed(settings.seed * 100_019 + epoch)
        total = static_total = 0.0
        for step, first in enumerate(range(0, n, batch)):
            lr = _learning_rate(epoch * steps + step, settings.epochs * steps, settings.lr)
            for group, scale in zip(optimizer.param_groups, (1, 1, 10)):
                group["lr"] = lr * scale
            idx = order[first:first + batch]
            pixels = shift_clips(data.pixels[idx], round(settings.max_shift * cfg.resolution), shifts)
            x = normalise(pixels.flatten(0, 1).float(), cfg)
            frames = F.normalize(encoder.embed_images(x), dim=-1).view(*pixels.shape[:2], -1)
            video = head(frames, data.times_s[idx], data.mask[idx])
            if len(texts) <= MAX_TEXT_BANK:  # a closed vocabulary: every text at every step
                bank_ids, groups = torch.arange(len(texts)), data.groups[idx]
            else:  # open captions: the batch's own texts, as CLIP
                bank_ids, groups = data.groups[idx].unique(return_inverse=True)
            bank = F.normalize(encoder.embed_texts([texts[i] for i in bank_ids.tolist()]), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100.0)
            smoothing = ALIGN_SMOOTHING if settings.loss == "align" else 0.0
            loss = vocabulary_loss(video, bank, scale, groups, smoothing=smoothing)
            if settings.mean_loss:  # what one frame shows goes into each frame's embedding, not only the head's
                static = vocabulary_loss(mean_pool(frames, data.mask[idx]), bank, scale, groups, smoothing=smoothing)
                static_total += float(static.detach()) * len(idx)
                loss = loss + settings.mean_loss * static
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        head.eval()
        record = {"epoch": epoch + 1, "loss": round(total / n, 5),
                  "logit_scale": round(float(model.logit_scale.detach().exp()), 3)}
        if settings.mean_loss:
            record["mean_pooled_loss"] = round(static_total / n, 5)
        if evaluate is not None:
            record.update(evaluate(encoder, head))
        log(record)
        tmp = checkpoint_dir.with_name(checkpoint_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        encoder.save_pretrained(tmp)
        save_checkpoint(tmp, head, shape, model.logit_scale, epoch=epoch + 1, settings=settings,
                        optimizer=optimizer if epoch + 1 < settings.epochs else None)
        _swap_in(tmp, checkpoint_dir)
    return head.eval()
