"""Batched tensor preprocessing with a checkpoint's own values, on whole uint8 batches (no per-image PIL loop)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange


@dataclass(frozen=True)
class PreprocessCfg:
    short_side: int | None  # resize so the short side has this many pixels (CLIP); None: resize to `size`
    size: tuple[int, int] | None  # resize to exactly (height, width) (EfficientNet/ALIGN); None: use short_side
    crop: tuple[int, int]  # centre crop (height, width) fed to the backbone
    mean: tuple[float, float, float]  # per-channel mean, after rescaling
    std: tuple[float, float, float]  # per-channel std, after rescaling
    rescale: float = 1 / 255  # multiply raw 0..255 values by this
    offset: bool = False  # subtract 1 after rescaling (ALIGN maps pixels to [-1, 1])
    top_std: tuple[float, float, float] | None = None  # EfficientNet `include_top`: divide by this std once more
    resample: str = "bicubic"  # the processor's resize filter (PIL's 2: bilinear, 3: bicubic), antialiased as PIL
    # SigLIP 2 NaFlex: (patch side, max patches): a frame keeps its aspect ratio, resized to the most patches that
    # fit; tiles are squares of that many patches
    naflex: tuple[int, int] | None = None

    @classmethod
    def from_processor_dict(cls, d: dict) -> "PreprocessCfg":
        """Read the values of a ``preprocessor_config.json`` (CLIPImageProcessor or EfficientNetImageProcessor)."""
        size = d.get("size") or {}
        crop = d.get("crop_size") or size
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if "shortest_edge" in crop:
            crop = {"height": crop["shortest_edge"], "width": crop["shortest_edge"]}
        do_norm = d.get("do_normalize", True)
        resample = {2: "bilinear", 3: "bicubic"}.get(d.get("resample"), "bicubic")
        if "max_num_patches" in d:  # NaFlex: no fixed size; tiles take the square of as many patches
            patch, most = int(d.get("patch_size", 16)), int(d["max_num_patches"])
            side = patch * math.isqrt(most)
            size, crop = {"height": side, "width": side}, {"height": side, "width": side}
        return cls(
            short_side=size.get("shortest_edge"),
            size=(size["height"], size["width"]) if "height" in size else None,
            crop=(crop["height"], crop["width"]) if d.get("do_center_crop", True) else (size["height"], size["width"]),
            mean=tuple(d.get("image_mean", (0.0,) * 3)) if do_norm else (0.0,) * 3,
            std=tuple(d.get("image_std", (1.0,) * 3)) if do_norm else (1.0,) * 3,
            rescale=float(d.get("rescale_factor", 1 / 255)) if d.get("do_rescale", True) else 1.0,
            offset=bool(d.get("rescale_offset", False)),
            top_std=tuple(d.get("image_std", (1.0,) * 3)) if d.get("include_top", False) else None,
            resample=resample,
            naflex=(patch, most) if "max_num_patches" in d else None,
        )

    @property
    def level1_side(self) -> int:
        """The short side a decoded frame needs for the whole-frame view (no finer, no detail is lost)."""
        return self.short_side or max(self.size)

    @property
    def squashes(self) -> bool:
        """The whole frame is resized to the backbone's square (no centre crop, aspect not kept)."""
        return self.size is not None and self.crop == self.size and self.naflex is None

    @property
    def whole_frame(self) -> bool:
        """Level 1 sees the whole frame (squashed, or NaFlex at its own aspect ratio), not a centre crop."""
        return self.squashes or self.naflex is not None

    @property
    def resolution(self) -> int:
        """The backbone's square input side in pixels."""
        return self.crop[0]


def resize_short_side(images: torch.Tensor, short_side: int, mode: str = "bicubic") -> torch.Tensor:
    """``[N,3,H,W]`` float -> short side = ``short_side``, aspect kept (antialiased like PIL)."""
    h, w = images.shape[-2:]
    scale = short_side / min(h, w)
    size = (max(short_side, round(h * scale)), max(short_side, round(w * scale)))
    if size == (h, w):
        return images
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False)


def naflex_size(height: int, width: int, patch: int, max_patches: int) -> tuple[int, int]:
    """SigLIP 2 NaFlex: the largest size of this aspect ratio, sides multiples of ``patch``, within ``max_patches``
    (transformers' own rule, so sizes match its processor exactly)."""
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches

    return get_image_size_for_max_num_patches(height, width, patch, max_patches)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop ``[..., H, W]``; pads with zeros where the image is smaller (as the HF processors do)."""
    h, w = images.shape[-2:]
    if h < height or w < width:
        ph, pw = max(height - h, 0), max(width - w, 0)
        images = F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = images.shape[-2:]
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return images[..., top:top + height, left:left + width]


def preprocess(frames: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> normalised float32 ``[N,3,h,w]`` ready for the backbone."""
    return normalise(resize_crop(frames, cfg), cfg)


def resize_crop(frames: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """uint8 ``[N,H,W,3]`` -> the backbone's view ``[N,3,h,w]``, float with integer values 0..255 (exactly
    representable as uint8: training caches it)."""
    x = rearrange(frames, "n h w c -> n c h w").float()
    if cfg.naflex is not None:
        size = naflex_size(*x.shape[-2:], *cfg.naflex)
        x = F.interpolate(x, size=size, mode=cfg.resample, antialias=True, align_corners=False)
        return x.clamp_(0, 255).round_()
    if cfg.size is not None:
        x = F.interpolate(x, size=cfg.size, mode=cfg.resample, antialias=True, align_corners=False)
    else:
        x = resize_short_side(x, cfg.short_side, cfg.resample)
    return center_crop(x.clamp_(0, 255).round_(), *cfg.crop)  # PIL rounds the resized image back to uint8


def normalise(x: torch.Tensor, cfg: PreprocessCfg) -> torch.Tensor:
    """Float pixels 0..255 ``[N,3,h,w]`` -> the model's input range."""
    x = x * cfg.rescale
    if cfg.offset:
        x = x - 1.0
    mean = torch.tensor(cfg.mean, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    if cfg.top_std is not None:
        x = x / torch.tensor(cfg.top_std, dtype=x.dtype).view(1, 3, 1, 1)
    return x
