"""Florence-style hierarchical tower: the whole frame plus grids of tiles, one backbone pass, fused.

Level 1 is the whole frame at the backbone's resolution R (exactly the plain backbone); level 2 is a 2x2 grid
of slightly overlapping R-sized tiles cut from the frame's centre square at about 2R; level 3 a 4x4 grid at
about 4R. (A checkpoint that squashes the whole frame to its square, without a centre crop, gets tiles over the
whole frame, squashed the same way.) Tiles let a small or off-centre action fill a backbone input.
``fine_frames`` limits the levels >= 2 to some frames of a segment, since they cost 4x and 16x the whole frame.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .preprocess import center_crop, normalise, preprocess, resize_short_side


def _grid(level: int, overlap: float) -> tuple[int, float]:
    """(tiles per side, square side in tile units): tiles overlap by ``overlap`` of a tile."""
    g = 2 ** (level - 1)
    return g, g - (g - 1) * overlap


def level_boxes(level: int, height: int, width: int, overlap: float = 0.0, *, squash: bool = False) -> torch.Tensor:
    """Normalised xyxy boxes ``[g*g, 4]`` of a level's views on a ``height x width`` frame, row-major: over the
    centre square, or over the whole frame when the checkpoint squashes frames to its square (``squash``)."""
    g, span = _grid(level, overlap)
    side_x, side_y = (width, height) if squash else (min(height, width),) * 2
    x0, y0 = (width - side_x) / 2 / width, (height - side_y) / 2 / height
    tile_x, tile_y = side_x / width / span, side_y / height / span  # one tile, in frame units
    step_x, step_y = tile_x * (1 - overlap), tile_y * (1 - overlap)
    return torch.tensor([[x0 + j * step_x, y0 + i * step_y, x0 + j * step_x + tile_x, y0 + i * step_y + tile_y]
                         for i in range(g) for j in range(g)])


def pick_frames(n: int, which: str | int) -> torch.Tensor:
    """Indices of ``n`` frames: ``all``, the ``middle`` one, or ``k`` spread evenly."""
    if which == "all":
        return torch.arange(n)
    k = 1 if which == "middle" else min(int(which), n)
    return ((torch.arange(k) + 0.5) * n / k).long()


class TowerOutput(NamedTuple):
    """What the tower gives for one segment of ``N`` frames, ``F`` of them fine."""

    fused: torch.Tensor  # [N, D] fused frame embeddings, normalised
    regions: torch.Tensor  # [F, V, D] every view of the fine frames, the whole frame first
    boxes: torch.Tensor  # [V, 4] normalised xyxy box of each view
    fine: torch.Tensor  # [F] which frames are fine
    raw: torch.Tensor | None = None  # [N, D] whole-frame embeddings before normalisation (a model's own pooling)


class ViewAttention(nn.Module):
    """Fuses a frame's views with the global view as the query; a zero-initialised residual on the global view,
    so an untrained fusion is exactly ``global``."""

    def __init__(self, dim: int, *, heads: int = 4):
        super().__init__()
        self.level_embed = nn.Parameter(torch.zeros(4, dim))  # indexed by level id 1..3
        self.attn = nn.MultiheadAttention(dim, heads if dim % heads == 0 else 1, batch_first=True)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, regions: torch.Tensor, level_ids: torch.Tensor) -> torch.Tensor:
        """``[F,V,D]`` normalised views (global first) + level ids ``[V]`` -> ``[F,D]`` normalised."""
        keys = regions + self.level_embed[level_ids]
        attended, _ = self.attn(regions[:, :1], keys, keys, need_weights=False)
        return F.normalize(regions[:, 0] + self.out(attended[:, 0]), dim=-1)


class HierarchicalTower(nn.Module):
    """Frames ``[N,H,W,3]`` uint8 -> fused frame embeddings ``[N,D]`` and, for the fine frames, region
    embeddings ``[F,V,D]`` with their boxes ``[V,4]``."""

    def __init__(self, encoder, *, levels: tuple[int, ...] = (1,), fusion: str = "global", batch_size: int = 8,
                 fine_frames: str | int = "all", overlap: float = 0.125):
        super().__init__()
        self.encoder, self.levels, self.fusion, self.batch_size = encoder, tuple(levels), fusion, batch_size
        self.fine_frames, self.overlap = fine_frames, overlap
        self.fuse = ViewAttention(encoder.embed_dim) if fusion == "attention" else None

    def fine_index(self, n: int, fine_frames: str | int | None = None) -> torch.Tensor:
        """Which of ``n`` frames get levels >= 2: all, the middle one, or ``k`` spread evenly (``fine_frames``,
        the tower's own by default)."""
        return pick_frames(n, "all" if self.levels == (1,) else fine_frames or self.fine_frames)

    def tile_views(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Levels >= 2 -> pixels ``[N,V',3,R,R]``, boxes ``[V',4]``, level ids ``[V']`` (V' may be 0)."""
        cfg = self.encoder.preprocess_cfg
        r, squash = cfg.resolution, cfg.squashes
        views, boxes, level_ids = [], [], []
        for level in (lv for lv in self.levels if lv > 1):
            g, span = _grid(level, self.overlap)
            side, step = round(span * r), round((1 - self.overlap) * r)
            x = rearrange(frames, "n h w c -> n c h w").float()
            if squash:  # tiles divide exactly what level 1 sees
                x = F.interpolate(x, size=(side, side), mode=cfg.resample, antialias=True, align_corners=False)
            else:
                x = center_crop(resize_short_side(x, side, cfg.resample), side, side)
            x = x.clamp_(0, 255).round_()
            tiles = torch.stack([x[..., i * step:i * step + r, j * step:j * step + r]
                                 for i in range(g) for j in range(g)], dim=1)  # [N, g*g, 3, R, R]
            views.append(rearrange(normalise(rearrange(tiles, "n v c h w -> (n v) c h w"), cfg),
                                   "(n v) c h w -> n v c h w", v=g * g))
            boxes.append(level_boxes(level, frames.shape[1], frames.shape[2], self.overlap, squash=squash))
            level_ids += [level] * g * g
        if not views:
            return frames.new_zeros((len(frames), 0, 3, r, r), dtype=torch.float32), torch.zeros(0, 4), \
                torch.zeros(0, dtype=torch.long)
        return torch.cat(views, dim=1), torch.cat(boxes), torch.tensor(level_ids)

    def _embed(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """Views ``[M_i,3,h_i,w_i]`` -> ``[sum M_i, D]`` raw embeddings, ``batch_size`` images per backbone call (views
        of one size together: sizes differ only where a NaFlex checkpoint sees each frame at its aspect ratio)."""
        pixels = [p for p in pixels if len(p)]
        parts = [torch.cat(pixels)] if len({p.shape[-2:] for p in pixels}) == 1 else pixels
        return torch.cat([self.encoder.forward_features(c) for part in parts for c in part.split(self.batch_size)])

    def forward(self, frames: torch.Tensor) -> TowerOutput:
        """One segment's frames ``[N,H,W,3]`` -> its :class:`TowerOutput`."""
        return self.forward_batch([frames])[0]

    def forward_batch(self, segments: list[torch.Tensor], *, fine_frames: str | int | None = None) -> list[TowerOutput]:
        """Several segments' frames (each ``[N_i,H_i,W_i,3]`` uint8, sizes may differ) -> a :class:`TowerOutput`
        each. Every view of every segment goes through the backbone together, ``batch_size`` images a call: whole
        frames first, then the tiles of the fine frames (``fine_frames`` overrides the tower's)."""
        cfg, pixels, plans = self.encoder.preprocess_cfg, [], []
        group = self.encoder.frames_per_call
        if group > 1 and any(len(frames) != group for frames in segments):
            raise ValueError(f"{self.encoder.family} embeds segments of exactly {group} frames (its num_frames), got "
                             f"{sorted({len(f) for f in segments})}")
        for frames in segments:
            fine = self.fine_index(len(frames), fine_frames or self.fine_frames)
            tiles, boxes, level_ids = self.tile_views(frames[fine])
            pixels += [preprocess(frames, cfg), rearrange(tiles, "f v c h w -> (f v) c h w")]
            plans.append((frames.shape[:3], fine, boxes, level_ids, tiles.shape[1]))
        raw = self._embed(pixels)
        emb, outputs, at = F.normalize(raw, dim=-1), [], 0
        for (n, height, width), fine, boxes, level_ids, tiles in plans:
            size = n + len(fine) * tiles
            whole_box = level_boxes(1, height, width, squash=cfg.whole_frame)
            out = self._fuse(emb[at:at + size], n, fine, torch.cat([whole_box, boxes]), level_ids)
            outputs.append(out._replace(raw=raw[at:at + n]))
            at += size
        return outputs

    def _fuse(self, emb: torch.Tensor, n: int, fine: torch.Tensor, boxes: torch.Tensor,
              level_ids: torch.Tensor) -> TowerOutput:
        """One segment's view embeddings (``n`` whole frames, then the fine frames' tiles) -> its output."""
        whole, tiles = emb[:n], rearrange(emb[n:], "(f v) d -> f v d", f=len(fine))
        if tiles.shape[1] == 0:
            return TowerOutput(whole, whole[fine, None], boxes, fine)
        regions = torch.cat([whole[fine, None], tiles], dim=1)  # [F, 1+V', D]
        level_ids = torch.cat([torch.ones(1, dtype=torch.long), level_ids])
        fused = whole.clone()
        if self.fusion == "mean":
            fused[fine] = F.normalize(regions.mean(1), dim=-1)
        elif self.fusion == "attention":
            fused[fine] = self.fuse(regions, level_ids)
        return TowerOutput(fused, regions, boxes, fine)
