"""Training the temporal head contrastively on cached frame embeddings, with safetensors checkpoints.

The backbone stays frozen, so every clip's frame embeddings are computed once (by the caller) and each epoch
only runs the small head. A checkpoint is ``head.safetensors`` (weights, the learned logit scale, the
optimizer's moments) plus ``head.json`` (shapes, epoch, settings): nothing in it is pickled or runs code.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .losses import LOSSES
from .pooling import AttentionPooling

HEAD_FILE, META_FILE = "head.safetensors", "head.json"


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
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    seed: int = 0


@dataclass
class ClipEmbeddings:
    """What the head trains on: per clip, frame embeddings, their times, a mask, and a text embedding."""

    frames: torch.Tensor  # [N, T, D] L2-normalised frame embeddings
    times_s: torch.Tensor  # [N, T] seconds
    mask: torch.Tensor  # [N, T] bool, True for real frames
    text: torch.Tensor  # [N, D] L2-normalised caption/label embeddings
    groups: torch.Tensor  # [N] int: clips with the same text share a group


def save_checkpoint(directory: str | Path, head: AttentionPooling, shape: HeadShape, log_scale: torch.Tensor, *,
                    epoch: int, settings: TrainSettings, optimizer: torch.optim.Optimizer | None = None,
                    extra: dict | None = None) -> Path:
    """Write ``head.safetensors`` and ``head.json`` into ``directory`` atomically (temporary name, rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
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


def _restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict, opt: dict) -> None:
    state: dict = {}
    for key, value in opt.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def fit(data: ClipEmbeddings, shape: HeadShape, settings: TrainSettings, *, checkpoint_dir: str | Path,
        log: Callable[[dict], None] = print, evaluate: Callable[[AttentionPooling], dict] | None = None,
        init_logit_scale: float = math.log(1 / 0.07)) -> AttentionPooling:
    """Train (or resume, if ``checkpoint_dir`` holds a checkpoint) for ``settings.epochs`` epochs; checkpoint
    after every epoch. Each epoch's shuffle is seeded by (seed, epoch), so a resumed run continues exactly."""
    checkpoint_dir = Path(checkpoint_dir)
    head = shape.build()
    log_scale = torch.nn.Parameter(torch.tensor(init_logit_scale))
    # the temperature moves 10x faster: it must grow well past its init when captions embed close together
    optimizer = torch.optim.AdamW([{"params": head.parameters()},
                                   {"params": [log_scale], "weight_decay": 0.0, "lr": 10 * settings.lr}],
                                  lr=settings.lr, weight_decay=settings.weight_decay)
    start = 0
    if (checkpoint_dir / HEAD_FILE).exists():
        restored, scale, meta, opt = load_checkpoint(checkpoint_dir)
        head.load_state_dict(restored.state_dict())
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
            video = head(data.frames[idx], data.times_s[idx], data.mask[idx])
            loss = loss_fn(video, data.text[idx], log_scale.exp().clamp(max=100.0), data.groups[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss) * len(idx)
        head.eval()
        record = {"epoch": epoch + 1, "loss": round(total / n, 5), "logit_scale": round(float(log_scale.exp()), 3)}
        if evaluate is not None:
            record.update(evaluate(head))
        log(record)
        save_checkpoint(checkpoint_dir, head, shape, log_scale, epoch=epoch + 1, settings=settings,
                        optimizer=optimizer)
    return head.eval()


@torch.no_grad()
def embed_clips(head: AttentionPooling | None, data: ClipEmbeddings) -> torch.Tensor:
    """``[N, D]`` normalised clip embeddings: the head, or mean pooling when ``head`` is None."""
    from .pooling import mean_pool

    if head is None:
        return mean_pool(data.frames, data.mask)
    return F.normalize(head(data.frames, data.times_s, data.mask), dim=-1)
