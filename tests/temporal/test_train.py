"""Checkpoints (safetensors + JSON, never pickle) and resuming, on synthetic embeddings."""

import json

import pytest
import torch
import torch.nn.functional as F

from encoders.tower import ViewAttention
from pipeline.config import TrainSpec
from temporal.checkpoint import HeadShape, load_checkpoint, load_fusion, recover_checkpoint, save_checkpoint, swap_in
from temporal.train import ClipEmbeddings, ClipPixels, HeadTask, ModelTask, fit


def _data(n=24, t=6, d=16, seed=0) -> ClipEmbeddings:
    g = torch.Generator().manual_seed(seed)
    frames = F.normalize(torch.randn(n, t, d, generator=g), dim=-1)
    groups = torch.arange(n) % 3
    text = F.normalize(torch.randn(3, d, generator=g), dim=-1)
    return ClipEmbeddings(frames, torch.linspace(0, 1, t).expand(n, t), torch.ones(n, t, dtype=torch.bool), text,
                          groups)


def _fit_head(data, settings, directory, log=lambda r: None, fuse=None):
    task = HeadTask(data, HeadShape(dim=16), settings, fuse=fuse)
    fit(task, settings, checkpoint_dir=directory, log=log)
    return task.head


def test_checkpoint_round_trip(tmp_path):
    head = HeadShape(dim=16).build()
    torch.nn.init.normal_(head.out.weight)
    save_checkpoint(tmp_path, head, HeadShape(dim=16), torch.tensor(2.5), epoch=3, settings={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.json", "head.safetensors"]
    assert json.loads((tmp_path / "head.json").read_text())["epoch"] == 3
    loaded, scale, meta, _ = load_checkpoint(tmp_path / "head.safetensors")
    x, times = torch.randn(2, 6, 16), torch.linspace(0, 1, 6).expand(2, 6)
    assert torch.equal(loaded(x, times), head.eval()(x, times)) and float(scale) == 2.5
    assert meta["shape"] == {"dim": 16, "heads": 4, "layers": 1, "queries": 1}


def _crash_in_epoch(n):
    def log(record):
        if record.get("epoch") == n:  # after the epoch's training, before its checkpoint
            raise KeyboardInterrupt
    return log


def test_resumed_training_equals_uninterrupted_training(tmp_path):
    data, settings = _data(), TrainSpec(epochs=4, batch_size=8)
    torch.manual_seed(0)
    straight = _fit_head(data, settings, tmp_path / "a")
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _fit_head(data, settings, tmp_path / "b", log=_crash_in_epoch(3))
    records = []
    resumed = _fit_head(data, settings, tmp_path / "b", log=records.append)
    assert records[0] == {"resumed_from_epoch": 2} and records[-1]["epoch"] == 4
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name
    # the finished checkpoint drops the optimizer's moments; asking for more epochs starts fresh ones
    assert load_checkpoint(tmp_path / "a")[3] == {}
    more = []
    _fit_head(data, TrainSpec(epochs=5, batch_size=8), tmp_path / "a", log=more.append)
    assert more[0] == {"resumed_from_epoch": 4} and more[-1]["epoch"] == 5


def test_a_view_fusion_trains_with_the_head_and_resumes_exactly(tmp_path):
    """``tower.fusion: attention`` is trained with the head (frozen backbone): it starts as the whole frame (a
    zero-initialised residual), moves, is saved as ``fuse.*`` with the views' levels, and resumes like the head."""
    base = _data()
    views = F.normalize(torch.randn(24, 6, 5, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    data = ClipEmbeddings(views[:, :, 0], base.times_s, base.mask, base.text, base.groups, views,
                          torch.tensor([1, 2, 2, 2, 2]))
    assert torch.allclose(data.fused(ViewAttention(16)).frames, data.frames, atol=1e-6)  # untrained: whole frame
    settings = TrainSpec(epochs=4, batch_size=8)
    torch.manual_seed(0)
    fuse = ViewAttention(16)
    head = _fit_head(data, settings, tmp_path / "a", fuse=fuse)
    assert fuse.out.weight.abs().sum() > 0
    assert json.loads((tmp_path / "a" / "head.json").read_text())["view_levels"] == [1, 2, 2, 2, 2]
    loaded = load_fusion(tmp_path / "a", ViewAttention(16))
    assert all(torch.equal(a, b) for a, b in zip(fuse.state_dict().values(), loaded.state_dict().values()))

    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        _fit_head(data, settings, tmp_path / "b", log=_crash_in_epoch(3), fuse=ViewAttention(16))
    resumed_fuse = ViewAttention(16)
    resumed = _fit_head(data, settings, tmp_path / "b", fuse=resumed_fuse)
    for a, b in zip([*head.state_dict().values(), *fuse.state_dict().values()],
                    [*resumed.state_dict().values(), *resumed_fuse.state_dict().values()]):
        assert torch.allclose(a, b, atol=1e-6)
    with pytest.raises(ValueError, match="no trained view fusion"):  # a head trained without one
        _fit_head(base, TrainSpec(epochs=1), tmp_path / "c")
        load_fusion(tmp_path / "c", ViewAttention(16))


def _pixels(n=12, t=4, r=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ClipPixels(torch.randint(0, 256, (n, t, 3, r, r), dtype=torch.uint8, generator=g),
                      torch.linspace(0, 1, t).expand(n, t), torch.ones(n, t, dtype=torch.bool), torch.arange(n) % 3)


def _scratch(directory):
    from encoders import create_encoder

    torch.manual_seed(0)
    return create_encoder("clip", pretrained=str(directory), local_files_only=True, dtype="float32", device="cpu",
                          scratch=True)


def test_end_to_end_training_resumes_after_a_crash_exactly_as_if_uninterrupted(tmp_path):
    """A crash after an epoch's training but before its checkpoint: the re-run starts from the previous epoch's
    checkpoint (model weights, head, optimizer moments) and ends bit-identical to a run that never stopped, random
    shifts and the mean-pooled loss included."""
    from encoders import create_encoder
    from encoders._tiny import save_tiny

    arch = save_tiny(tmp_path / "arch", words=("red", "green", "blue"), weights=False, squash=True)
    assert not list(arch.glob("*.safetensors"))  # architecture, tokenizer, preprocessing only
    data, texts, shape = _pixels(), ["red", "green", "blue"], HeadShape(dim=16)
    settings = TrainSpec(backbone="scratch", epochs=3, batch_size=4, max_shift=0.125, mean_loss=0.5)

    def fit_model(encoder, directory, log=lambda r: None):
        task = ModelTask(encoder, data, texts, shape, settings)
        fit(task, settings, checkpoint_dir=directory, log=log)
        return task.head

    straight = fit_model(_scratch(arch), tmp_path / "a")

    def crash_in_epoch_2(record):
        if record.get("epoch") == 2:
            raise KeyboardInterrupt

    try:
        fit_model(_scratch(arch), tmp_path / "b", log=crash_in_epoch_2)
    except KeyboardInterrupt:
        pass
    assert json.loads((tmp_path / "b" / "head.json").read_text())["epoch"] == 1
    records = []
    encoder = create_encoder("clip", pretrained=str(tmp_path / "b"), local_files_only=True, dtype="float32",
                             device="cpu")
    resumed = fit_model(encoder, tmp_path / "b", log=records.append)
    assert records[0] == {"resumed_from_epoch": 1} and records[-1]["epoch"] == 3
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    final = {name: create_encoder("clip", pretrained=str(tmp_path / name), local_files_only=True, dtype="float32",
                                  device="cpu").model.state_dict() for name in "ab"}
    assert all(torch.equal(final["a"][k], final["b"][k]) for k in final["a"])
    # the finished checkpoint is a model directory and a head; the optimizer's moments are dropped at the end
    _, _, meta, opt = load_checkpoint(tmp_path / "a")
    assert meta["epoch"] == 3 and opt == {}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "head.json",
            "head.safetensors"} <= {p.name for p in (tmp_path / "a").iterdir()}


def test_the_mean_pooled_loss_is_trained_and_logged(tmp_path):
    """``mean_loss``: each clip's mean frame embedding is also contrasted with its text (what one frame shows, here
    its colour, then lives in the frames themselves, not only in the head's residual); its own loss is logged."""
    from encoders._tiny import save_tiny

    arch = save_tiny(tmp_path / "arch", words=("red", "green", "blue"), weights=False, squash=True)
    groups = torch.arange(12) % 3
    colour = torch.tensor([[200, 20, 20], [20, 200, 20], [20, 20, 200]])[groups]
    noise = torch.randint(-30, 30, (12, 4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    pixels = (colour[:, None, :, None, None] + noise).clamp(0, 255).to(torch.uint8)
    data = ClipPixels(pixels, torch.linspace(0, 1, 4).expand(12, 4), torch.ones(12, 4, dtype=torch.bool), groups)

    def train(weight, epochs, batch):
        records = []
        settings = TrainSpec(backbone="scratch", epochs=epochs, batch_size=batch, lr=3e-3, mean_loss=weight)
        task = ModelTask(_scratch(arch), data, ["red", "green", "blue"], HeadShape(dim=16), settings)
        fit(task, settings, checkpoint_dir=tmp_path / f"{weight}-{epochs}", log=records.append)
        return records

    # one step: the untrained head is exactly mean pooling, so the objective is (1 + weight) x the mean-pooled loss
    (single,) = train(0.5, 1, 12)
    assert single["loss"] == pytest.approx(1.5 * single["mean_pooled_loss"], rel=1e-4)
    (off,) = train(0.0, 1, 12)
    assert "mean_pooled_loss" not in off and off["loss"] == pytest.approx(single["mean_pooled_loss"], rel=1e-4)
    static = [r["mean_pooled_loss"] for r in train(1.0, 6, 4)]
    assert static[-1] < 0.5 * static[0]


def test_bf16_training_runs_in_bf16_with_eager_attention_and_tracks_fp32(tmp_path):
    """``train.precision: bfloat16``: while training, the model's linear layers compute in bf16 (autocast) and
    attention is eager (torch's CPU flash attention backward in bf16 was 3.5x slower than in fp32); the weights
    stay fp32, the losses follow an fp32 run's, and evaluation and the saved model are back on the model's own
    attention."""
    from encoders._tiny import save_tiny

    arch = save_tiny(tmp_path / "arch", words=("red", "green", "blue"), weights=False, squash=True)
    data, texts = _pixels(), ["red", "green", "blue"]

    def train(bf16):
        encoder, seen = _scratch(arch), []
        inference_attention = encoder.model.config._attn_implementation
        layer = encoder.model.vision_model.encoder.layers[0].mlp.fc1
        layer.register_forward_hook(lambda m, i, out: seen.append(
            (out.dtype, encoder.model.config._attn_implementation, m.weight.dtype, m.training)))
        settings = TrainSpec(backbone="scratch", epochs=3, batch_size=4, lr=3e-3)
        records = []
        task = ModelTask(encoder, data, texts, HeadShape(dim=16), settings, bf16=bf16)
        fit(task, settings, checkpoint_dir=tmp_path / f"bf16-{bf16}", log=records.append)
        assert encoder.model.config._attn_implementation == inference_attention
        saved = json.loads((tmp_path / f"bf16-{bf16}" / "config.json").read_text())
        assert "eager" not in json.dumps(saved)
        return [r["loss"] for r in records], {s for s in seen if s[3]}, inference_attention

    bf16, seen16, inference = train(True)
    assert seen16 == {(torch.bfloat16, "eager", torch.float32, True)}, seen16
    fp32, seen32, _ = train(False)
    assert seen32 == {(torch.float32, inference, torch.float32, True)}, seen32
    assert bf16[-1] < bf16[0] and bf16 == pytest.approx(fp32, rel=0.05), (bf16, fp32)


def test_a_checkpoint_swap_interrupted_anywhere_is_recovered(tmp_path):
    final, old = tmp_path / "model", tmp_path / "model.old"
    old.mkdir()
    (old / "w").write_text("epoch 1")
    assert (recover_checkpoint(final) / "w").read_text() == "epoch 1" and not old.exists()  # crashed mid-swap
    old.mkdir()
    (old / "w").write_text("stale")  # crashed after the swap, before the clean-up
    new = tmp_path / "model.tmp"
    new.mkdir()
    (new / "w").write_text("epoch 2")
    swap_in(new, final)
    assert (final / "w").read_text() == "epoch 2" and not old.exists() and not new.exists()


def test_a_checkpoint_resumes_only_the_same_job(tmp_path):
    """More epochs is the same job, trained longer; other data or other hyperparameters are another job, refused
    (a changed manifest used to report success and train nothing; changed layers died in load_state_dict)."""
    from temporal.checkpoint import CheckpointError

    data, settings = _data(), TrainSpec(epochs=1, batch_size=8)
    fit(HeadTask(data, HeadShape(dim=16), settings, job={"manifest": "aaa"}), settings, checkpoint_dir=tmp_path,
        log=lambda r: None)
    longer = TrainSpec(epochs=2, batch_size=8)
    fit(HeadTask(data, HeadShape(dim=16), longer, job={"manifest": "aaa"}), longer, checkpoint_dir=tmp_path,
        log=lambda r: None)
    for job, other in (({"manifest": "bbb"}, longer), ({"manifest": "aaa"}, TrainSpec(epochs=3, layers=2))):
        with pytest.raises(CheckpointError, match="another job"):
            fit(HeadTask(data, HeadShape(dim=16, layers=other.layers), other, job=job), other,
                checkpoint_dir=tmp_path, log=lambda r: None)
