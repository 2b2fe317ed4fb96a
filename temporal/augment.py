"""Training-time augmentation of cached clip pixels (``train.augment``), on the fly, in torch, per batch.

Only what keeps every label true: brightness, contrast, gamma, blur, sensor noise, JPEG-like re-compression and
mild crops. Never hue, saturation or anything else that could turn a red shape orange, nor flips or rotations
(they turn "moving left" into "moving right"). Each clip draws its own values, the same for all its frames
(noise excepted), so what changes between frames is still only the action.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def augment_clips(pixels: torch.Tensor, spec, generator: torch.Generator) -> torch.Tensor:
    """Clips ``[B,T,3,R,R]`` with values 0..255 -> the same, augmented by ``spec`` (a
    :class:`pipeline.config.AugmentSpec`), float32."""
    x = pixels.float()
    b = len(x)

    def draw(low: float, high: float) -> torch.Tensor:  # one value per clip, broadcast over its frames and pixels
        return (low + (high - low) * torch.rand(b, generator=generator)).view(b, 1, 1, 1, 1)

    def chosen(p: float) -> torch.Tensor:
        return (torch.rand(b, generator=generator) < p).view(b, 1, 1, 1, 1)

    if spec.crop:
        x = _crop(x, spec.crop, generator)
    if spec.brightness:
        x = x + 255 * draw(-spec.brightness, spec.brightness)
    if spec.contrast:
        mean = x.mean(dim=(1, 2, 3, 4), keepdim=True)
        x = mean + (x - mean) * draw(1 - spec.contrast, 1 + spec.contrast)
    if spec.gamma:
        x = 255 * (x.clamp(0, 255) / 255) ** torch.exp(draw(-spec.gamma, spec.gamma))
    if spec.blur:
        x = _where_chosen(chosen(spec.blur), _blur, x, draw(0.3, 1.2))
    if spec.noise:
        x = x + 255 * draw(0, spec.noise) * torch.randn(x.shape, generator=generator)
    x = x.clamp(0, 255).round()
    if spec.jpeg:
        x = _where_chosen(chosen(spec.jpeg), _recompress, x, draw(20, 80))
    return x


def _where_chosen(chosen: torch.Tensor, transform, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``transform(x, value)`` on the clips ``chosen`` (``[B,1,1,1,1]`` bools), the rest as they are: only the
    chosen clips are computed (run on every clip, blur and re-compression made augmenting a batch ~45% slower)."""
    picked = chosen.view(-1).nonzero().view(-1)
    if len(picked) == 0:
        return x
    x = x.clone()
    x[picked] = transform(x[picked], value[picked])
    return x


def _crop(x: torch.Tensor, most: float, generator: torch.Generator) -> torch.Tensor:
    """Zoom each clip into a random window of at least ``1 - most`` of each side (the whole clip the same window),
    resized back to ``R``: a shape stays in view unless it was at the very border."""
    b, t, c, h, w = x.shape
    scale = 1 - most * torch.rand(b, generator=generator)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - scale)
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - scale)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = scale, scale, cx, cy
    grid = F.affine_grid(theta.repeat_interleave(t, 0), [b * t, c, h, w], align_corners=False)
    out = F.grid_sample(rearrange(x, "b t c h w -> (b t) c h w"), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return rearrange(out, "(b t) c h w -> b t c h w", b=b)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A separable Gaussian of per-clip ``sigma`` (pixels), reflect-padded."""
    b, t, c, h, w = x.shape
    radius = 3
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma.view(b, 1) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # [B, K]
    flat = rearrange(x, "b t c h w -> 1 (b t c) h w")
    k = kernel.repeat_interleave(t * c, 0)  # [B*T*C, K]
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * t * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * t * c)
    return rearrange(flat, "1 (b t c) h w -> b t c h w", b=b, t=t)


_LUMA = torch.tensor([[16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
                      [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
                      [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
                      [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=torch.float32)


def _dct_matrix(n: int = 8) -> torch.Tensor:
    k, i = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    d[0] /= math.sqrt(2)
    return d


def _recompress(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG's lossy step on 8x8 blocks: YCbCr, DCT, quantisation by the standard luma table at a per-clip
    ``quality`` (chroma at twice the step), inverse. Sides not a multiple of 8 are edge-padded."""
    b, t, c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    flat = F.pad(rearrange(x, "b t c h w -> (b t) c h w"), (0, pw, 0, ph), mode="replicate")
    r, g, bl = flat[:, 0], flat[:, 1], flat[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * bl
    q = quality.view(b).repeat_interleave(t)
    scale = torch.where(q < 50, 50 / q, 2 - q / 50).view(-1, 1, 1, 1, 1)  # IJG's quality scaling
    d = _dct_matrix()
    out = []
    for channel, factor in ((y, 1.0), (cb, 2.0), (cr, 2.0)):
        blocks = rearrange(channel - 128, "n (i p) (j q) -> n i j p q", p=8, q=8)
        coef = d @ blocks @ d.T
        step = (_LUMA * factor * scale).clamp(min=1)
        coef = torch.round(coef / step) * step
        out.append(rearrange(d.T @ coef @ d, "n i j p q -> n (i p) (j q)") + 128)
    y, cb, cr = out
    rgb = torch.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                       y + 1.772 * (cb - 128)], dim=1)[..., :h, :w]
    return rearrange(rgb.clamp(0, 255).round(), "(b t) c h w -> b t c h w", b=b)
