"""train.augment: what it changes (brightness, contrast, gamma, blur, noise, re-compression, crops) and what it must
never change (a label: the colour's hue, which way the shape moves)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import AugmentSpec, ConfigError, parse_spec
from pipeline.synth import Clip, render
from temporal.augment import augment_clips

EVERYTHING = AugmentSpec(brightness=0.3, contrast=0.4, gamma=0.4, blur=0.5, noise=0.04, jpeg=0.5, crop=0.15)


def _clips(n=12):
    """uint8-valued float clips [B,3,3,64,64] of SynthActions shapes (hard edges, grey background)."""
    out = []
    for i in range(n):
        colour, motion = ("red", "green", "blue", "yellow")[i % 4], ("moving left", "moving right")[i % 2]
        frames = render(Clip(colour, "square", motion, width=64, height=64, size=0.35, seed=i))
        out.append(torch.from_numpy(frames[[0, len(frames) // 2, -1]]).permute(0, 3, 1, 2).float())
    return torch.stack(out)


def test_nothing_set_is_the_identity_and_a_seed_repeats():
    x = _clips(4)
    assert torch.equal(augment_clips(x, AugmentSpec(), torch.Generator().manual_seed(0)), x)
    a, b = (augment_clips(x, EVERYTHING, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.min() >= 0 and a.max() <= 255


def test_labels_survive_everything():
    """The shape's dominant colour channel(s) and the direction of its motion are those of the original."""
    x = _clips(12)
    y = augment_clips(x, EVERYTHING, torch.Generator().manual_seed(3))
    for clip, aug in zip(x, y):
        grey = (clip - 128).abs().sum(1) < 1  # [T, H, W]: background pixels of the original
        shape = ~grey
        for t in range(3):
            before = clip[t][:, shape[t]].mean(1)
            after = aug[t][:, shape[t]].mean(1) - aug[t][:, grey[t]].mean(1)
            assert int(torch.argmax(before - 128)) == int(torch.argmax(after)), "hue changed"
        def centre_x(frame):  # the shape: pixels far from the frame's median colour
            median = frame.flatten(1).median(1).values[:, None, None]
            return float(torch.nonzero((frame - median).abs().sum(0) > 90)[:, 1].float().mean())

        assert np.sign(centre_x(aug[2]) - centre_x(aug[0])) == np.sign(centre_x(clip[2]) - centre_x(clip[0])) != 0


def test_per_clip_values_are_the_same_for_all_its_frames():
    x = _clips(2)[:, :1].repeat(1, 3, 1, 1, 1)  # three identical frames
    y = augment_clips(x, AugmentSpec(brightness=0.3, contrast=0.4, gamma=0.4, blur=1.0, crop=0.2),
                      torch.Generator().manual_seed(1))
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])


def test_recompression_keeps_flat_areas_and_blurs_edges():
    x = _clips(2)
    y = augment_clips(x, AugmentSpec(jpeg=1.0), torch.Generator().manual_seed(0))
    assert (y - x).abs()[..., :8, :8].max() <= 2  # a flat 8x8 block survives JPEG's quantisation
    assert 0 < (y - x).abs().mean() < 10


def test_augment_is_for_whole_model_training_only(tmp_path):
    with pytest.raises(ConfigError, match="train.augment: is used only when the whole model trains"):
        parse_spec(f"input: {{paths: ['{tmp_path}']}}\noutput: {{dir: '{tmp_path}'}}\n"
                   "train: {augment: {brightness: 0.2}}\n")
    with pytest.raises(ConfigError, match="train.augment.crop: must be in"):
        parse_spec(f"input: {{paths: ['{tmp_path}']}}\noutput: {{dir: '{tmp_path}'}}\n"
                   "train: {backbone: scratch, augment: {crop: 0.9}}\n")
