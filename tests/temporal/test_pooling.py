import torch
import torch.nn.functional as F

from temporal.pooling import AttentionPooling, mean_pool


def test_mean_pool_ignores_padding():
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    padded = x.clone()
    padded[0, 3:] = 100.0
    out = mean_pool(padded, mask)
    assert torch.allclose(out[0], F.normalize(x[0, :3].mean(0), dim=-1), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), torch.ones(2))


def test_untrained_attention_pooling_is_exactly_mean_pooling():
    torch.manual_seed(0)
    pool = AttentionPooling(16)
    x, times = torch.randn(3, 6, 16), torch.linspace(0, 2, 6).expand(3, 6)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    assert torch.equal(pool(x, times, mask), mean_pool(x, mask))


def test_attention_pooling_can_tell_order_once_its_output_is_nonzero():
    torch.manual_seed(0)
    pool = AttentionPooling(16)
    torch.nn.init.normal_(pool.out.weight)
    x, times = torch.randn(1, 6, 16), torch.linspace(0, 2, 6)[None]
    assert torch.allclose(mean_pool(x), mean_pool(x.flip(1)), atol=1e-6)  # mean pooling cannot
    assert not torch.allclose(pool(x, times), pool(x.flip(1), times), atol=1e-3)


def test_padding_is_invisible_to_attention_pooling():
    torch.manual_seed(0)
    pool = AttentionPooling(16)
    torch.nn.init.normal_(pool.out.weight)
    x, times = torch.randn(1, 6, 16), torch.linspace(0, 2, 6)[None]
    padded_x = torch.cat([x, torch.randn(1, 3, 16) * 50], dim=1)
    padded_t = torch.cat([times, torch.tensor([[9.0, 9.5, 10.0]])], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    assert torch.allclose(pool(padded_x, padded_t, mask), pool(x, times), atol=1e-5)
