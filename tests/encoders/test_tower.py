import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders import HierarchicalTower, create_encoder, preprocess
from encoders.tower import level_boxes


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("tiny_clip")


def _frames(n=5, h=48, w=80):
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (n, h, w, 3), dtype=np.uint8))


def test_level_one_global_equals_the_plain_backbone_exactly(encoder):
    frames = _frames()
    fused, regions, boxes = HierarchicalTower(encoder, levels=(1,), fusion="global", batch_size=8)(frames)
    plain = F.normalize(encoder.forward_features(preprocess(frames, encoder.preprocess_cfg)), dim=-1)
    assert torch.equal(fused, plain) and regions.shape == (5, 1, encoder.embed_dim)
    assert boxes[0].tolist() == pytest.approx([0.2, 0.0, 0.8, 1.0])  # CLIP's centre square of an 80x48 frame


def test_levels_shapes_and_mean_fusion(encoder):
    frames = _frames(n=2)
    tower = HierarchicalTower(encoder, levels=(1, 2, 3), fusion="mean")
    pixels, boxes, level_ids = tower.views(frames)
    assert pixels.shape == (2, 1 + 4 + 16, 3, 32, 32) and boxes.shape == (21, 4)
    assert level_ids.tolist() == [1] + [2] * 4 + [3] * 16
    fused, regions, _ = tower(frames)
    assert torch.allclose(fused, F.normalize(regions.mean(1), dim=-1), atol=1e-6)
    assert torch.allclose(regions.norm(dim=-1), torch.ones(2, 21), atol=1e-5)


def test_tiles_are_the_pixels_of_their_boxes(encoder):
    """A level-2 tile is the frame region its box names: paint one quadrant and find it in that tile only."""
    frames = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    frames[0, 32:, 32:] = 255  # bottom-right quadrant
    pixels, boxes, _ = HierarchicalTower(encoder, levels=(1, 2), fusion="mean").views(frames)
    brightness = pixels[0, 1:].mean(dim=(1, 2, 3))
    assert brightness.argmax().item() == 3 and boxes[4].tolist() == [0.5, 0.5, 1.0, 1.0]


def test_boxes_cover_the_centre_square():
    for level in (1, 2, 3):
        boxes = level_boxes(level, 90, 160)
        area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum().item()
        assert area == pytest.approx(90 / 160)
        assert boxes[:, 0].min().item() == pytest.approx(35 / 160) and boxes[:, 3].max().item() == pytest.approx(1.0)
