"""The head checkpoint: its files, what they hold, and whether one fits a model.

A checkpoint directory holds ``head.safetensors`` (the temporal head's weights as ``head.*``, a trained view fusion
as ``fuse.*``, the learned logit scale, the optimizer's moments as ``opt.*`` until training ends) and ``head.json``
(the head's shape, the epoch, the training settings, the optimizer's parameter groups, and ``view_levels`` when it
has a fusion). Whole-model training writes the model's ``save_pretrained`` files into the same directory. Nothing
in it is pickled or runs code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import atomic_path, write_text_atomic
from .pooling import AttentionPooling

HEAD_FILE, META_FILE = "head.safetensors", "head.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or not for this model; the message says which and why."""


@dataclass(frozen=True)
class HeadShape:
    dim: int  # embedding width
    heads: int = 4  # attention heads
    layers: int = 1  # transformer blocks over the frames
    queries: int = 1  # learned queries of the pooler

    def build(self) -> AttentionPooling:
        return AttentionPooling(self.dim, heads=self.heads, layers=self.layers, queries=self.queries)


def _directory(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_dir() or path.name != HEAD_FILE else path.parent


def has_head(path: str | os.PathLike) -> bool:
    return (_directory(path) / HEAD_FILE).is_file()


def read_meta(path: str | os.PathLike) -> dict:
    """``head.json`` of the checkpoint at ``path`` (its directory or its ``head.safetensors``)."""
    meta = _directory(path) / META_FILE
    try:
        with open(meta) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {meta}: {e}") from None


def trained_view_levels(path: str | os.PathLike) -> list[int] | None:
    """The level of each view whose fusion was trained with the head at ``path``; None: it has no fusion."""
    if not (_directory(path) / META_FILE).is_file():
        return None
    return read_meta(path).get("view_levels")


def save_checkpoint(directory: str | os.PathLike, head: AttentionPooling, shape: HeadShape, log_scale: torch.Tensor,
                    *, epoch: int, settings: dict, optimizer: torch.optim.Optimizer | None = None,
                    fuse: torch.nn.Module | None = None, view_levels: list[int] | None = None) -> Path:
    """Write ``head.safetensors`` and ``head.json`` into ``directory``, each atomically (training writes a whole
    checkpoint into a fresh directory and swaps it in: :func:`swap_in`); with ``fuse``, the trained view fusion
    too (``view_levels``: the level of each view it fuses)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()}
    meta = {"shape": asdict(shape), "epoch": epoch, "settings": settings, "param_groups": []}
    if fuse is not None:
        tensors.update({f"fuse.{k}": v.detach().contiguous() for k, v in fuse.state_dict().items()})
        meta["view_levels"] = list(view_levels)
    tensors["log_logit_scale"] = log_scale.detach().reshape(1)  # the learned parameter; logit scale = exp
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, values in state["state"].items():
            for name, value in values.items():
                tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).contiguous()
        meta["param_groups"] = [dict(g) for g in state["param_groups"]]
    with atomic_path(directory / HEAD_FILE) as tmp:
        save_file(tensors, tmp)
    write_text_atomic(directory / META_FILE, json.dumps(meta, indent=2) + "\n")
    return directory


def load_checkpoint(path: str | os.PathLike) -> tuple[AttentionPooling, torch.Tensor, dict, dict]:
    """``path``: a checkpoint directory or its ``head.safetensors`` -> head, log of the logit scale, meta,
    optimizer tensors."""
    meta = read_meta(path)
    tensors = load_file(_directory(path) / HEAD_FILE)
    head = HeadShape(**meta["shape"]).build()
    head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
    opt = {k[4:]: v for k, v in tensors.items() if k.startswith("opt.")}
    return head.eval(), tensors["log_logit_scale"][0], meta, opt


def load_fusion(path: str | os.PathLike, fuse: torch.nn.Module) -> torch.nn.Module:
    """Load the view fusion trained with the head at ``path`` into ``fuse``."""
    directory = _directory(path)
    state = {k[5:]: v for k, v in load_file(directory / HEAD_FILE).items() if k.startswith("fuse.")}
    if not state:
        raise CheckpointError(f"{directory} has no trained view fusion (train one with tower.fusion: attention)")
    fuse.load_state_dict(state)
    return fuse.eval()


def restore_optimizer(optimizer: torch.optim.Optimizer, meta: dict, opt: dict) -> None:
    """Put the checkpoint's moments back; a finished run dropped them, and more epochs then start fresh ones."""
    if not meta["param_groups"]:
        return
    state: dict = {}
    for key, value in opt.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def swap_in(tmp: Path, final: Path) -> None:
    """Replace directory ``final`` with ``tmp``; a crash at any point leaves ``final`` or ``final.old`` whole, and
    :func:`recover_checkpoint` puts things right."""
    old = recover_checkpoint(final).with_name(final.name + ".old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def recover_checkpoint(directory: str | os.PathLike) -> Path:
    """Finish an interrupted :func:`swap_in` (restore ``directory.old`` if ``directory`` is missing, else drop
    it); returns ``directory``."""
    directory = Path(directory)
    old = directory.with_name(directory.name + ".old")
    if old.exists():
        if directory.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, directory)
    return directory
