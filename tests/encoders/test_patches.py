"""encoders.patches: a checkpoint's patch embedding resized (FlexiViT's pseudo-inverse resize) or its token grid made
finer, loaded back through
the same from_pretrained path as any checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from encoders import create_encoder
from encoders.models import checkpoint_preprocess
from encoders.patches import PatchResizeError, main, resize_patch_weight, resize_positions, resize_vit


def _load(directory):
    return create_encoder("clip", pretrained=str(directory), local_files_only=True, dtype="float32", device="cpu")


def test_resized_patches_see_an_upsampled_image_as_the_original_saw_it(tiny_clip_dir, tmp_path):
    resize_vit(tiny_clip_dir, tmp_path / "big", patch_size=12)  # the tiny CLIP: 8 px patches at 32 px
    small, big = _load(tiny_clip_dir), _load(tmp_path / "big")
    assert big.model.config.vision_config.patch_size == 12 and big.model.config.vision_config.image_size == 48
    assert checkpoint_preprocess(family="clip", pretrained=str(tmp_path / "big")).resolution == 48
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    # each 8 px patch bilinearly resized to 12 px on its own (resizing the whole image mixes neighbouring patches
    # at their borders: close, not equal)
    patches = rearrange(x, "n c (i p) (j q) -> (n i j) c p q", p=8, q=8)
    up = rearrange(F.interpolate(patches, size=(12, 12), mode="bilinear", align_corners=False),
                   "(n i j) c p q -> n c (i p) (j q)", n=4, i=4)
    want, got = small.forward_features(x), big.forward_features(up)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    # what the pseudo-inverse is for: the weights interpolated as an image do not keep the tokens
    naive = F.interpolate(small.model.vision_model.embeddings.patch_embedding.weight, size=(12, 12), mode="bilinear")
    with torch.no_grad():
        big.model.vision_model.embeddings.patch_embedding.weight.copy_(naive * (8 / 12) ** 2)
    assert not torch.allclose(big.forward_features(up), want, atol=1e-2)
    # the tokenizer and a temporal head in the directory travel with it
    assert sorted(p.name for p in (tmp_path / "big").iterdir()) == sorted(
        p.name for p in tiny_clip_dir.iterdir() if p.is_file())


def test_resize_keeps_the_grid_and_round_trips_the_same_size():
    w = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert resize_patch_weight(w, 12).shape == (5, 3, 12, 12)
    assert torch.allclose(resize_patch_weight(w, 8), w, atol=1e-5)


def test_resize_refuses_an_occupied_destination_and_a_non_vit(tiny_clip_dir, tiny_align_dir, tmp_path, capsys):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(PatchResizeError, match="not empty"):
        resize_vit(tiny_clip_dir, occupied, patch_size=12)
    assert [p.name for p in occupied.iterdir()] == ["notes.txt"] and (occupied / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="not a ViT checkpoint"):
        main([str(tiny_align_dir), str(tmp_path / "align"), "--patch-size", "12"])
    assert not (tmp_path / "align").exists()


def test_a_finer_grid_keeps_the_patches_and_resizes_the_positions(tiny_clip_dir, tmp_path):
    vision = resize_vit(tiny_clip_dir, tmp_path / "fine", grid=6)  # the tiny CLIP: 4 x 4 patches of 8 px
    assert (vision["patch_size"], vision["image_size"]) == (8, 48)
    small, fine = _load(tiny_clip_dir), _load(tmp_path / "fine")
    assert checkpoint_preprocess(family="clip", pretrained=str(tmp_path / "fine")).resolution == 48
    old, new = (m.model.vision_model.embeddings for m in (small, fine))
    assert torch.equal(old.patch_embedding.weight, new.patch_embedding.weight)
    assert new.position_embedding.weight.shape == (1 + 36, old.position_embedding.weight.shape[1])
    assert torch.equal(new.position_embedding.weight[0], old.position_embedding.weight[0])  # the class token's
    assert fine.forward_features(torch.rand(2, 3, 48, 48)).shape == small.forward_features(torch.rand(2, 3, 32, 32)).shape


def test_positions_resize_smoothly_with_or_without_a_class_token():
    same = torch.randn(1 + 16, 5, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(resize_positions(same, 4, 4), same, atol=1e-6)
    flat = torch.ones(16, 5) * torch.arange(5.0)  # no class token (SigLIP): a constant grid stays constant
    assert torch.allclose(resize_positions(flat, 4, 7), torch.ones(49, 5) * torch.arange(5.0), atol=1e-5)
    ramp = torch.arange(8.0).repeat(8, 1).reshape(64, 1)  # a ramp across the grid stays ordered across the finer one
    fine = resize_positions(ramp, 8, 12).reshape(12, 12)
    assert (fine[:, 1:] > fine[:, :-1]).all() and torch.allclose(fine[0], fine[5])


def test_nothing_to_resize_is_refused(tiny_clip_dir, tmp_path):
    with pytest.raises(SystemExit, match="a patch size, a grid or both"):
        main([str(tiny_clip_dir), str(tmp_path / "same")])
    assert not (tmp_path / "same").exists()
