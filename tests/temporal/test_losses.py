import math

import torch
import torch.nn.functional as F

from temporal.losses import align_loss, clip_loss


def _pair(b=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(b, d, generator=g), dim=-1)


def test_clip_loss_matches_the_formula():
    v, t = _pair()
    scale = torch.tensor(10.0)
    logits = scale * v @ t.T
    by_hand = 0.0
    for i in range(5):  # -log softmax of the matching pair, both directions
        by_hand += -math.log(math.exp(logits[i, i]) / sum(math.exp(logits[i, j]) for j in range(5)))
        by_hand += -math.log(math.exp(logits[i, i]) / sum(math.exp(logits[j, i]) for j in range(5)))
    assert torch.allclose(clip_loss(v, t, scale), torch.tensor(by_hand / 10), atol=1e-5)


def test_align_loss_is_the_label_smoothed_version():
    v, t = _pair(seed=1)
    scale = torch.tensor(7.0)
    logits = scale * v @ t.T
    target = torch.full((5, 5), 0.1 / 5) + 0.9 * torch.eye(5)
    by_hand = -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.T.log_softmax(1)).sum(1).mean()
    assert torch.allclose(align_loss(v, t, scale), by_hand / 2, atol=1e-5)
    assert not torch.allclose(align_loss(v, t, scale), clip_loss(v, t, scale))


def test_clips_sharing_a_caption_are_not_negatives_of_each_other():
    v, t = _pair(b=4, seed=2)
    t = t[[0, 0, 1, 1]]  # two captions, each twice
    groups = torch.tensor([0, 0, 1, 1])
    scale = torch.tensor(5.0)
    assert torch.allclose(clip_loss(v, t, scale, groups), clip_loss(v, t, scale, torch.tensor([0, 0, 1, 1])))
    assert clip_loss(v, t, scale, groups) < clip_loss(v, t, scale)  # eye() would punish the duplicates
    assert torch.allclose(clip_loss(v, t[[0, 1, 2, 3]], scale, torch.arange(4)), clip_loss(v, t, scale))
