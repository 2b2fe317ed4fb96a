"""CLIP and ALIGN wrappers against the transformers reference path, on tiny checkpoints saved to disk."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders import ModelLoadError, create_encoder, list_encoders, preprocess
from encoders.models import checkpoint_preprocess


def test_registry_builds_every_family():
    assert {"clip", "align", "tiny_clip", "tiny_align"} <= set(list_encoders())
    for name in ("tiny_clip", "tiny_align"):
        enc = create_encoder(name)
        emb = enc.forward_features(torch.zeros(2, 3, enc.preprocess_cfg.resolution, enc.preprocess_cfg.resolution))
        assert emb.shape == (2, enc.embed_dim) and enc.encode_text(["a red circle"]).shape == (1, enc.embed_dim)
    with pytest.raises(ValueError, match="unknown encoder 'clop'"):
        create_encoder("clop")


def _images(n=3, h=48, w=40, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("family", ["clip", "align"])
def test_loaded_checkpoint_matches_the_reference_processor_and_model(family, tiny_clip_dir, tiny_align_dir):
    from transformers import AlignModel, AutoImageProcessor, AutoTokenizer, CLIPModel

    path = {"clip": tiny_clip_dir, "align": tiny_align_dir}[family]
    enc = create_encoder(family, pretrained=str(path), local_files_only=True, dtype="float32", device="cpu")
    ref = {"clip": CLIPModel, "align": AlignModel}[family].from_pretrained(path).eval()
    processor, tokenizer = AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    frames = _images()
    ours = enc.forward_features(preprocess(frames, enc.preprocess_cfg))
    pixels = processor(images=list(frames.numpy()), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        theirs = ref.get_image_features(pixel_values=pixels).pooler_output
        texts = ["a red circle", "a blue square moving"]
        ref_text = ref.get_text_features(**tokenizer(texts, padding=True, return_tensors="pt")).pooler_output
    assert F.cosine_similarity(ours, theirs).min() >= 0.999
    assert torch.allclose(enc.encode_text(texts), ref_text, atol=1e-5)


def test_missing_checkpoint_is_one_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load the clip checkpoint .* Set model.pretrained"):
        create_encoder("clip", pretrained=str(tmp_path), local_files_only=True)
    with pytest.raises(ModelLoadError, match="no-such/model"):
        checkpoint_preprocess(family="clip", pretrained="no-such/model", local_files_only=True)


def test_checkpoint_preprocess_reads_processor_values(tiny_clip_dir, tiny_align_dir):
    clip = checkpoint_preprocess(family="clip", pretrained=str(tiny_clip_dir))
    assert (clip.short_side, clip.crop, clip.offset) == (32, (32, 32), False)
    align = checkpoint_preprocess(family="align", pretrained=str(tiny_align_dir))
    assert (align.size, align.crop, align.offset, align.mean) == ((36, 36), (32, 32), True, (0.0, 0.0, 0.0))
