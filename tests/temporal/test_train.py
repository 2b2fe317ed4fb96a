"""Checkpoints (safetensors + JSON, never pickle) and resuming, on synthetic embeddings."""

import json

import torch
import torch.nn.functional as F

from temporal.train import ClipEmbeddings, HeadShape, TrainSettings, fit, load_checkpoint, save_checkpoint


def _data(n=24, t=6, d=16, seed=0) -> ClipEmbeddings:
    g = torch.Generator().manual_seed(seed)
    frames = F.normalize(torch.randn(n, t, d, generator=g), dim=-1)
    groups = torch.arange(n) % 3
    text = F.normalize(torch.randn(3, d, generator=g), dim=-1)[groups]
    return ClipEmbeddings(frames, torch.linspace(0, 1, t).expand(n, t), torch.ones(n, t, dtype=torch.bool), text,
                          groups)


def test_checkpoint_round_trip(tmp_path):
    head = HeadShape(dim=16).build()
    torch.nn.init.normal_(head.out.weight)
    save_checkpoint(tmp_path, head, HeadShape(dim=16), torch.tensor(2.5), epoch=3, settings=TrainSettings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    assert json.loads((tmp_path / "head.json").read_text())["epoch"] == 3
    loaded, scale, meta, _ = load_checkpoint(tmp_path / "head.safetensors")
    x, times = torch.randn(2, 6, 16), torch.linspace(0, 1, 6).expand(2, 6)
    assert torch.equal(loaded(x, times), head.eval()(x, times)) and float(scale) == 2.5
    assert meta["shape"] == {"dim": 16, "heads": 4, "layers": 1, "queries": 1}


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    data, shape = _data(), HeadShape(dim=16)
    torch.manual_seed(0)
    straight = fit(data, shape, TrainSettings(epochs=4, batch_size=8), checkpoint_dir=tmp_path / "a",
                   log=lambda r: None)
    torch.manual_seed(0)
    fit(data, shape, TrainSettings(epochs=2, batch_size=8), checkpoint_dir=tmp_path / "b", log=lambda r: None)
    records = []
    resumed = fit(data, shape, TrainSettings(epochs=4, batch_size=8), checkpoint_dir=tmp_path / "b",
                  log=records.append)
    assert records[0] == {"resumed_from_epoch": 2} and records[-1]["epoch"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
