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
    fused, regions, boxes, fine, _ = HierarchicalTower(encoder, levels=(1,), fusion="global", batch_size=8)(frames)
    plain = F.normalize(encoder.forward_features(preprocess(frames, encoder.preprocess_cfg)), dim=-1)
    assert torch.equal(fused, plain) and regions.shape == (5, 1, encoder.embed_dim) and fine.tolist() == [0, 1, 2, 3, 4]
    assert boxes[0].tolist() == pytest.approx([0.2, 0.0, 0.8, 1.0])  # CLIP's centre square of an 80x48 frame


def test_levels_shapes_and_mean_fusion(encoder):
    frames = _frames(n=2)
    tower = HierarchicalTower(encoder, levels=(1, 2, 3), fusion="mean")
    pixels, boxes, level_ids = tower.tile_views(frames)
    assert pixels.shape == (2, 4 + 16, 3, 32, 32) and boxes.shape == (20, 4)
    assert level_ids.tolist() == [2] * 4 + [3] * 16
    fused, regions, boxes, _, _ = tower(frames)
    assert regions.shape == (2, 21, encoder.embed_dim) and boxes.shape == (21, 4)
    assert torch.allclose(fused, F.normalize(regions.mean(1), dim=-1), atol=1e-6)
    assert torch.allclose(regions.norm(dim=-1), torch.ones(2, 21), atol=1e-5)


def test_untrained_attention_fusion_equals_global(encoder):
    frames = _frames(n=3)
    fused, regions, _, _, _ = HierarchicalTower(encoder, levels=(1, 2), fusion="attention")(frames)
    assert torch.allclose(fused, regions[:, 0], atol=1e-6)
    plain = HierarchicalTower(encoder, levels=(1,), fusion="global")(frames)[0]
    assert torch.allclose(fused, plain, atol=1e-6)


def test_fine_frames_limit_the_tiles(encoder):
    frames = _frames(n=8)
    whole = HierarchicalTower(encoder, levels=(1,))(frames)[0]
    for fine_frames, expected in (("middle", [4]), (2, [2, 6]), ("all", list(range(8)))):
        fused, regions, _, fine, _ = HierarchicalTower(encoder, levels=(1, 2), fusion="mean", fine_frames=fine_frames)(
            frames)
        assert fine.tolist() == expected and regions.shape[0] == len(expected)
        others = [i for i in range(8) if i not in expected]
        assert torch.equal(fused[others], whole[others])  # frames without tiles keep the whole-frame embedding
        assert not torch.allclose(fused[expected], whole[expected])


def test_tiles_are_the_pixels_of_their_boxes(encoder):
    """A level-2 tile is the frame region its box names: paint one quadrant and find it in that tile only."""
    frames = torch.zeros(1, 64, 64, 3, dtype=torch.uint8)
    frames[0, 40:, 40:] = 255  # inside the bottom-right tile only, whatever the overlap
    tower = HierarchicalTower(encoder, levels=(1, 2), fusion="mean", overlap=0.125)
    pixels, boxes, _ = tower.tile_views(frames)
    assert pixels[0].mean(dim=(1, 2, 3)).argmax().item() == 3
    assert boxes[3].tolist() == pytest.approx([1 - 1 / 1.875, 1 - 1 / 1.875, 1.0, 1.0])
    assert boxes[0].tolist() == pytest.approx([0.0, 0.0, 1 / 1.875, 1 / 1.875])


@pytest.mark.parametrize("overlap", [0.0, 0.125])
def test_boxes_cover_the_centre_square(overlap):
    for level in (1, 2, 3):
        boxes = level_boxes(level, 90, 160, overlap)
        assert boxes[:, 0].min().item() == pytest.approx(35 / 160)
        assert boxes[:, 2].max().item() == pytest.approx(125 / 160)
        assert boxes[:, 1].min().item() == pytest.approx(0.0) and boxes[:, 3].max().item() == pytest.approx(1.0)
        widths = boxes[:, 2] - boxes[:, 0]
        assert torch.allclose(widths, widths[0].expand_as(widths))
        if overlap == 0:
            area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum().item()
            assert area == pytest.approx(90 / 160)


def test_a_squashing_checkpoint_gets_tiles_over_the_whole_frame(tmp_path):
    """A preprocessor that resizes the whole frame to the square (no centre crop, as the demo model's): level 1 sees
    the whole frame, so the tiles divide the whole frame too, squashed the same way."""
    from encoders._tiny import save_tiny

    encoder = create_encoder("clip", pretrained=str(save_tiny(tmp_path / "m", squash=True)), local_files_only=True,
                             dtype="float32", device="cpu")
    assert encoder.preprocess_cfg.squashes
    frames = torch.zeros(1, 40, 120, 3, dtype=torch.uint8)
    frames[0, :20, :60] = 255  # the top-left quarter of a wide frame is white
    tower = HierarchicalTower(encoder, levels=(1, 2), fusion="mean", overlap=0.0)
    pixels, boxes, _ = tower.tile_views(frames)
    assert torch.allclose(boxes, torch.tensor([[0, 0, 0.5, 0.5], [0.5, 0, 1, 0.5], [0, 0.5, 0.5, 1], [0.5, 0.5, 1, 1]]))
    brightness = pixels[0].mean(dim=(1, 2, 3))
    assert brightness.argmax().item() == 0 and (brightness[0] - brightness[1:]).min() > 1.0  # only tile 0 is white
    _, _, whole_box, _, _ = tower(frames)
    assert whole_box[0].tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0])
