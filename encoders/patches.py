"""A ViT checkpoint with other patches or a finer token grid, written as a new ``save_pretrained`` directory.

``--patch-size``: the same token grid at a larger input side, the patch embedding resized by FlexiViT's
pseudo-inverse resize (Beyer et al., 2023): ``w' = pinv(B^T) w``, where ``B`` bilinearly resizes a patch from the
old side to the new. On an image whose patches are each so upsampled the new embedding gives the old one's tokens
exactly (on a whole upsampled image, nearly), and fine-tuning from there teaches it the detail the larger input has.

``--grid``: more tokens across the frame at the same patch size (a larger input), the position embeddings resized
bicubically. A model trained on a coarse grid and run on a finer one sees small things in more tokens than it was
trained with (FixRes, Touvron et al., 2019): no training, ~2.3x the compute a frame for 12 x 12 against 8 x 8.

The demo model (``make demo-model``; README, "The demo model") goes on from its base resized from 8 px patches at
64 px to 12 px at 96 (stage 2 trains on the 8 x 8 grid), and ships on a 12 x 12 grid at 144 px.

    python -m encoders.patches SRC DST --patch-size 12
    python -m encoders.patches SRC DST --grid 12
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
PATCH_KEY = "vision_model.embeddings.patch_embedding.weight"  # CLIP, MetaCLIP 2, SigLIP: [D, 3, p, p]
POSITION_KEY = "vision_model.embeddings.position_embedding.weight"  # [prefix + grid * grid, D] (CLIP: 1, SigLIP: 0)


class PatchResizeError(ValueError):
    """The checkpoint is not a ViT this can resize, or the destination is not free."""


def resize_matrix(old: int, new: int) -> torch.Tensor:
    """``[new*new, old*old]``: a flattened ``old`` x ``old`` patch -> the same patch bilinearly resized to ``new``."""
    basis = torch.eye(old * old, dtype=torch.float64).view(-1, 1, old, old)
    return F.interpolate(basis, size=(new, new), mode="bilinear", align_corners=False).view(old * old, -1).T


def resize_patch_weight(weight: torch.Tensor, new: int) -> torch.Tensor:
    """``[D, C, p, p]`` -> ``[D, C, new, new]`` by the pseudo-inverse resize."""
    d, c, old, _ = weight.shape
    pinv = torch.linalg.pinv(resize_matrix(old, new).T)  # [new*new, old*old]
    flat = weight.double().reshape(d * c, old * old)
    return (flat @ pinv.T).reshape(d, c, new, new).to(weight.dtype).contiguous()


def resize_positions(positions: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """``[prefix + old*old, D]`` -> ``[prefix + new*new, D]``: the grid's embeddings resized bicubically, a class
    token's (the prefix) kept."""
    prefix = positions.shape[0] - old * old
    grid = positions[prefix:].float().T.reshape(1, -1, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False).reshape(-1, new * new).T
    return torch.cat([positions[:prefix].float(), grid]).to(positions.dtype).contiguous()


def resize_vit(src: str | Path, dst: str | Path, *, patch_size: int | None = None, grid: int | None = None) -> dict:
    """Write ``src`` (a ``save_pretrained`` directory with ``model.safetensors``) to ``dst`` with patches of
    ``patch_size`` and/or a token grid of ``grid`` x ``grid`` (each unchanged when None), the input side
    ``patch_size * grid``: config, preprocessor sizes and weights; every other file (tokenizer, a temporal head)
    copied as it is. Returns the new vision config."""
    src, dst = Path(src), Path(dst)
    if patch_size is None and grid is None:
        raise PatchResizeError("give a patch size, a grid or both")
    if dst.exists() and any(dst.iterdir()):
        raise PatchResizeError(f"{dst} is not empty: give a new directory")
    config = json.loads((src / "config.json").read_text())
    vision = config.get("vision_config", {})
    if not {"patch_size", "image_size"} <= vision.keys() or not (src / WEIGHTS).exists():
        raise PatchResizeError(f"{src}: not a ViT checkpoint with vision_config.patch_size, image_size and {WEIGHTS}")
    old_patch, side = vision["patch_size"], vision["image_size"]
    if side % old_patch:
        raise PatchResizeError(f"{src}: image_size {side} is not a multiple of patch_size {old_patch}")
    old_grid = side // old_patch
    patch_size, grid = patch_size or old_patch, grid or old_grid
    new_side = patch_size * grid
    weights = load_file(src / WEIGHTS)
    for key in (PATCH_KEY, POSITION_KEY):
        if key not in weights:
            raise PatchResizeError(f"{src}: no {key} in {WEIGHTS}")
    if weights[POSITION_KEY].shape[0] - old_grid * old_grid not in (0, 1):
        raise PatchResizeError(f"{src}: {POSITION_KEY} does not hold a {old_grid} x {old_grid} grid")
    if patch_size != old_patch:
        weights[PATCH_KEY] = resize_patch_weight(weights[PATCH_KEY], patch_size)
    if grid != old_grid:
        weights[POSITION_KEY] = resize_positions(weights[POSITION_KEY], old_grid, grid)

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda d, names: [n for n in names if (Path(d) / n).is_dir()])
    vision.update(patch_size=patch_size, image_size=new_side)
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    processor = tmp / "preprocessor_config.json"
    if processor.exists():
        pre = json.loads(processor.read_text())
        for key in ("size", "crop_size"):  # every side in them scales with the input ("shortest_edge" too)
            if isinstance(pre.get(key), dict):
                pre[key] = {k: v * new_side // side if isinstance(v, int) else v for k, v in pre[key].items()}
            elif isinstance(pre.get(key), int):
                pre[key] = pre[key] * new_side // side
        processor.write_text(json.dumps(pre, indent=2) + "\n")
    save_file(weights, tmp / WEIGHTS, metadata={"format": "pt"})
    if dst.exists():
        dst.rmdir()
    tmp.rename(dst)
    return vision


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a save_pretrained directory (CLIP, MetaCLIP 2, SigLIP)")
    p.add_argument("dst", help="a new directory")
    p.add_argument("--patch-size", type=int, help="new patch side in px (the grid stays)")
    p.add_argument("--grid", type=int, help="new token grid, tokens a side (the patch size stays)")
    args = p.parse_args(argv)
    try:
        vision = resize_vit(args.src, args.dst, patch_size=args.patch_size, grid=args.grid)
    except (PatchResizeError, OSError) as e:
        raise SystemExit(f"encoders.patches: {e}")
    print(f"{args.dst}: patches of {vision['patch_size']} px at {vision['image_size']} px")


if __name__ == "__main__":
    main()
