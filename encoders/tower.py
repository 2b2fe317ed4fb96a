"""Florence-style hierarchical tower: the whole frame plus grids of tiles, one backbone call, fused.

Level 1 is the whole frame at the backbone's resolution R (the plain backbone, exactly); level 2 is a
2x2 grid of R-sized tiles cut from the frame's centre square at 2R; level 3 a 4x4 grid at 4R.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .preprocess import center_crop, normalise, preprocess, resize_short_side


def level_boxes(level: int, height: int, width: int) -> torch.Tensor:
    """Normalised xyxy boxes ``[g*g, 4]`` of a level's views on a ``height x width`` frame, row-major."""
    g = 2 ** (level - 1)
    side = min(height, width)
    x0, y0 = (width - side) / 2 / width, (height - side) / 2 / height
    sx, sy = side / width / g, side / height / g
    return torch.tensor([[x0 + j * sx, y0 + i * sy, x0 + (j + 1) * sx, y0 + (i + 1) * sy]
                         for i in range(g) for j in range(g)])


class HierarchicalTower(nn.Module):
    """Frames ``[N,H,W,3]`` uint8 -> fused frame embeddings ``[N,D]`` and region embeddings ``[N,V,D]``."""

    def __init__(self, encoder, *, levels: tuple[int, ...] = (1,), fusion: str = "global", batch_size: int = 8):
        super().__init__()
        self.encoder, self.levels, self.fusion, self.batch_size = encoder, tuple(levels), fusion, batch_size

    def views(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> pixels ``[N,V,3,R,R]``, boxes ``[V,4]`` (normalised xyxy), level id per view ``[V]``."""
        cfg = self.encoder.preprocess_cfg
        r = cfg.resolution
        views, boxes, level_ids = [], [], []
        for level in self.levels:
            if level == 1:
                views.append(preprocess(frames, cfg)[:, None])
            else:
                g = 2 ** (level - 1)
                x = rearrange(frames, "n h w c -> n c h w").float()
                x = center_crop(resize_short_side(x, g * r), g * r, g * r).clamp_(0, 255).round_()
                tiles = rearrange(x, "n c (gy r1) (gx r2) -> n (gy gx) c r1 r2", gy=g, gx=g)
                views.append(rearrange(normalise(rearrange(tiles, "n v c h w -> (n v) c h w"), cfg),
                                       "(n v) c h w -> n v c h w", v=g * g))
            boxes.append(level_boxes(level, frames.shape[1], frames.shape[2]))
            level_ids += [level] * boxes[-1].shape[0]
        return torch.cat(views, dim=1), torch.cat(boxes), torch.tensor(level_ids)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> fused ``[N,D]``, regions ``[N,V,D]`` (both L2-normalised), boxes ``[V,4]``."""
        pixels, boxes, _ = self.views(frames)
        n = pixels.shape[0]
        flat = rearrange(pixels, "n v c h w -> (n v) c h w")
        emb = torch.cat([self.encoder.forward_features(chunk) for chunk in flat.split(self.batch_size)])
        regions = F.normalize(rearrange(emb, "(n v) d -> n v d", n=n), dim=-1)
        fused = regions[:, 0] if self.fusion == "global" else F.normalize(regions.mean(1), dim=-1)
        return fused, regions, boxes
