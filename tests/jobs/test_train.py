"""The proof that order is learned: motions whose frames, reversed, are another motion. Mean pooling cannot
tell them apart (a clip and its reverse embed identically); `reeltag train` teaches the attention head to."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from encoders._tiny import save_tiny
from encoders.video_text import decode_short_side
from jobs.train import training_precision
from pipeline.config import parse_spec
from pipeline.stages import run_sequential
from pipeline.synth import sample_clips, write_clips
from pipeline.validate import check_spec
from temporal.pooling import mean_pool

MOTIONS = ("moving left", "moving right", "growing", "shrinking")
SMALL = dict(frame_sizes=((64, 48),), fps=(15.0, 15.0), duration_s=(1.2, 1.2), size=(0.25, 0.4), noise=(0.0, 0.0))


def _clips(n: int, seed: int) -> list:
    """Fixed speed, centred paths and one encoding quality: the set these tests were calibrated on."""
    return [replace(c, travel=0.8, offset=0.0, crf=18) for c in sample_clips(n, seed=seed, motions=MOTIONS, **SMALL)]


@pytest.fixture(scope="module")
def motion_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("motions")
    train = write_clips(root / "train", _clips(160, 0), caption=lambda c: c.motion)
    val = write_clips(root / "val", _clips(60, 1), caption=lambda c: c.motion)
    model = save_tiny(root / "model", words=MOTIONS)
    config = root / "train.yaml"
    config.write_text(f"input: {{paths: ['{root}/val']}}\nmodel: {{pretrained: '{model}', dtype: float32}}\n"
                      f"temporal: {{pooling: attention}}\noutput: {{dir: '{root}/out'}}\n"
                      f"train: {{manifest: '{train}', eval_manifest: '{val}', epochs: 60, batch_size: 32}}\n")
    return root, config


def reeltag(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def test_a_clip_and_its_reverse_are_identical_under_mean_pooling():
    frames = torch.randn(1, 8, 16)
    assert torch.allclose(mean_pool(frames), mean_pool(frames.flip(1)), atol=1e-6)


@pytest.mark.slow
def test_reeltag_train_learns_order_that_mean_pooling_cannot_see(motion_set):
    root, config = motion_set
    mean = reeltag("eval", config, "--set", "temporal.pooling=mean")
    assert mean.returncode == 0, mean.stderr
    chance = json.loads((root / "out" / "eval.json").read_text())
    assert chance["top1"] <= 0.6  # left/right and growing/shrinking pairs are indistinguishable: 50% at best

    trained = reeltag("train", config)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((root / "out" / "train.json").read_text())
    assert summary["eval"]["top1"] >= 0.95 and summary["eval"]["R@5"] == 1.0, summary
    assert "temporal.checkpoint=" in trained.stdout
    head = root / "out" / "head"
    assert (head / "head.safetensors").exists() and (head / "head.json").exists()

    evaluated = reeltag("eval", config, "--set", f"temporal.checkpoint={head}")
    assert evaluated.returncode == 0 and json.loads((root / "out" / "eval.json").read_text())["top1"] >= 0.95
    log = [json.loads(line) for line in (root / "out" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["epoch"] == 60
    # the same output.dir with other clips is another job: refused in one line, before decoding anything
    other = reeltag("train", config, "--set", f"train.manifest={root / 'val' / 'labels.jsonl'}")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "holds a checkpoint of another job (manifest changed)" in other.stderr and "--restart" in other.stderr

    # the trained head loads through temporal.checkpoint in a tagging pipeline, and tags the motion right
    vocab = root / "motions.txt"
    vocab.write_text("\n".join(MOTIONS) + "\n")
    spec = parse_spec(config.read_text(), overrides=[f"temporal.checkpoint={head}", f"tags.vocabulary={vocab}",
                                                     "tags.prompts=['{}']", "segments.mode=whole"])
    labels = [json.loads(line) for line in (root / "val" / "labels.jsonl").read_text().splitlines()][:12]
    rows = [r for r in run_sequential(spec, [r["uri"] for r in labels], short_side=32).to_pylist()
            if r["kind"] == "segment"]
    right = np.mean([r["tags"][0]["label"] == lab["motion"] for r, lab in zip(rows, labels)])
    assert right >= 0.9


@pytest.mark.slow
def test_search_finds_a_motion_by_its_caption(motion_set):
    """`reeltag index` (Ray, embedded) then `reeltag search`: with the trained head, each motion's own caption
    ranks clips of that motion first."""
    root, config = motion_set
    head = root / "out" / "head"
    if not (head / "head.safetensors").exists():
        assert reeltag("train", config).returncode == 0
    labels = [json.loads(line) for line in (root / "val" / "labels.jsonl").read_text().splitlines()][:16]
    index_dir = root / "indexed"
    indexed = reeltag("index", config, "--set", f"temporal.checkpoint={head}", "--set", "segments.mode=whole",
                      "--set", f"input.paths=[{','.join(r['uri'] for r in labels)}]",
                      "--set", f"output.dir={index_dir}", "--set", "ray.num_cpus=2")
    assert indexed.returncode == 0, indexed.stderr
    assert "index: 16 segments" in indexed.stdout
    motion_of = {r["uri"]: r["motion"] for r in labels}
    for motion in MOTIONS:
        found = reeltag("search", index_dir, motion, "--top-k", "3", "--json")
        assert found.returncode == 0, found.stderr
        answer = json.loads(found.stdout)
        assert answer["query"] == {"text": motion, "top_k": 3} and answer["took_ms"] >= 0
        results = answer["results"]
        assert len(results) == 3 and [motion_of[r["uri"]] for r in results] == [motion] * 3, (motion, results)
        assert results[0]["score"] >= results[1]["score"] >= results[2]["score"]
    text = reeltag("search", index_dir, "moving left", "--top-k", "2")
    assert text.returncode == 0 and len(text.stdout.strip().splitlines()) == 3  # a header and two results
    missing = reeltag("search", root / "nowhere", "moving left")
    assert missing.returncode == 2 and "not a reeltag output directory" in missing.stderr


def test_cached_embeddings_are_not_reused_when_the_model_is_retrained_in_place(tmp_path):
    """`make demo-model` copies the retrained model over the old one, then trains the tiled head on it: the frozen
    model's embeddings were cached under its path alone, and the head was trained on the old model's."""
    from jobs.train import _cache_key
    from pipeline.manifest import read_manifest

    clips = read_manifest(write_clips(tmp_path / "clips", sample_clips(2, seed=3, **SMALL)))
    model = save_tiny(tmp_path / "model", seed=0)
    spec = parse_spec(f"input: {{paths: ['{tmp_path}/clips']}}\nmodel: {{pretrained: '{model}'}}\n"
                      f"output: {{dir: '{tmp_path}/out'}}\n")
    before = [_cache_key(spec, clips, kind, 64, "") for kind in ("pixels", "views")]
    save_tiny(tmp_path / "model", seed=1)  # the same path, other weights
    after = [_cache_key(spec, clips, kind, 64, "") for kind in ("pixels", "views")]
    assert after[0] == before[0] and after[1] != before[1]


def test_clips_decoded_in_threads_come_back_in_order_and_a_bad_one_is_skipped(tmp_path):
    """The training cache decodes clips in a thread per core: its pixels are each clip's own frames in manifest
    order (as decoding them one by one gives), and a file that does not decode is logged and masked, not fatal."""
    from jobs.train import _decode_clips
    from pipeline.decode import decode_span
    from pipeline.manifest import read_manifest

    labels = write_clips(tmp_path / "clips", sample_clips(9, seed=3, **SMALL))
    (tmp_path / "clips" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(300))
    lines = labels.read_text().splitlines()
    lines.insert(4, json.dumps({"uri": str(tmp_path / "clips" / "broken.mp4"), "caption": "nothing"}))
    labels.write_text("\n".join(lines) + "\n")
    clips = read_manifest(labels)
    spec = parse_spec(f"input: {{paths: ['{tmp_path}/clips']}}\noutput: {{dir: '{tmp_path}/out'}}\n")
    records = []
    cached = _decode_clips(spec, clips, "pixels", 48, lambda x: x, records.append)
    assert cached["ok"].tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    (skipped,) = records
    assert skipped["skipped"].endswith("broken.mp4") and skipped["message"], skipped
    for i, clip in enumerate(clips):
        if i != 4:
            pixels, times = decode_span(clip.uri, clip.start_s, clip.end_s, spec.sampling.frames, 48)
            assert torch.equal(cached["pixels"][i], torch.from_numpy(pixels)), i
            assert torch.allclose(cached["times"][i], torch.as_tensor(times, dtype=torch.float32)), i


@pytest.mark.slow
def test_reeltag_train_a_whole_model_from_scratch(tmp_path):
    """`train.backbone: scratch`: from an architecture directory (config, tokenizer, preprocessing; no weights),
    the vision and text towers and the head learn colour from pixels; the result is a checkpoint directory that
    `model.pretrained` and `temporal.checkpoint` load like any other."""
    colours = ("red", "green", "blue", "yellow")
    sizes = dict(frame_sizes=((48, 32), (32, 48)), fps=(10.0, 10.0), duration_s=(1.0, 1.0), size=(0.4, 0.6))
    train = write_clips(tmp_path / "train", sample_clips(48, seed=0, **sizes), caption=lambda c: c.colour)
    val = write_clips(tmp_path / "val", sample_clips(24, seed=1, **sizes), caption=lambda c: c.colour)
    arch = save_tiny(tmp_path / "arch", words=colours, weights=False, squash=True, width=32, embed_dim=32)
    config = tmp_path / "train.yaml"
    config.write_text(f"input: {{paths: ['{tmp_path}/val']}}\nmodel: {{pretrained: '{arch}'}}\n"
                      f"sampling: {{frames: 3}}\n"
                      f"temporal: {{pooling: attention}}\noutput: {{dir: '{tmp_path}/out'}}\n"
                      f"train: {{backbone: scratch, manifest: '{train}', eval_manifest: '{val}', epochs: 30, "
                      f"batch_size: 8, lr: 0.003}}\n")
    trained = reeltag("train", config)
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "out" / "train.json").read_text())
    assert summary["backbone"] == "scratch" and summary["eval"]["top1"] >= 0.9, summary
    assert summary["precision"] == training_precision("auto")  # bf16 autocast where this CPU has native bf16
    model = tmp_path / "out" / "model"
    assert f"model.pretrained={model}" in trained.stdout and f"temporal.checkpoint={model}" in trained.stdout
    vocab = tmp_path / "colours.txt"
    vocab.write_text("\n".join(colours) + "\n")
    spec = parse_spec(config.read_text(), overrides=[f"model.pretrained={model}", f"temporal.checkpoint={model}",
                                                     f"tags.vocabulary={vocab}", "tags.prompts=['{}']",
                                                     "segments.mode=whole"])
    labels = [json.loads(line) for line in (tmp_path / "val" / "labels.jsonl").read_text().splitlines()]
    uris = [r["uri"] for r in labels]
    rows = [r for r in run_sequential(spec, uris, short_side=decode_short_side(spec)).to_pylist()
            if r["kind"] == "segment"]
    assert np.mean([r["tags"][0]["label"] == lab["colour"] for r, lab in zip(rows, labels)]) >= 0.9

    # finetune goes on from that model and, with temporal.checkpoint, from its head (at a vanishing rate: unchanged)
    again = ["--set", "train.backbone=finetune", "--set", f"model.pretrained={model}", "--set",
             f"temporal.checkpoint={model}", "--set", "train.epochs=1", "--set", "train.lr=1.0e-12"]
    tuned = reeltag("train", config, *again, "--set", f"output.dir={tmp_path}/tuned")
    assert tuned.returncode == 0, tuned.stderr
    from safetensors.torch import load_file
    start, end = load_file(model / "head.safetensors"), load_file(tmp_path / "tuned" / "model" / "head.safetensors")
    heads = [k for k in start if k.startswith("head.")]
    assert heads and all(torch.allclose(start[k], end[k], atol=1e-6) for k in heads)
    other = reeltag("train", config, *again, "--set", "train.heads=2", "--set", f"output.dir={tmp_path}/other")
    assert other.returncode == 2 and "train.heads" in other.stderr and "Traceback" not in other.stderr, other.stderr


@pytest.mark.slow
def test_reeltag_train_trains_the_tower_fusion_with_the_head(motion_set, tmp_path):
    """`tower.fusion: attention` is trained by `reeltag train` (frozen backbone) together with the head, saved in
    its checkpoint with the levels of its views, and loaded by `reeltag eval` and by the pipeline; a config that
    asks for it without such a checkpoint is refused, naming the key."""
    from safetensors.torch import load_file

    from pipeline.config import ConfigError

    root, config = motion_set
    tower = ["tower.levels=[1,2]", "tower.fusion=attention", "tower.fine_frames=middle"]
    sets = [arg for item in tower for arg in ("--set", item)]
    out = tmp_path / "out"
    trained = reeltag("train", config, *sets, "--set", f"output.dir={out}", "--set", "train.epochs=20")
    assert trained.returncode == 0, trained.stderr
    head = out / "head"
    assert json.loads((head / "head.json").read_text())["view_levels"] == [1, 2, 2, 2, 2]
    fuse = {k: v for k, v in load_file(head / "head.safetensors").items() if k.startswith("fuse.")}
    assert fuse and fuse["fuse.out.weight"].abs().sum() > 0  # zero-initialised: it trained
    summary = json.loads((out / "train.json").read_text())
    evaluated = reeltag("eval", config, *sets, "--set", f"output.dir={out}", "--set", f"temporal.checkpoint={head}")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads((out / "eval.json").read_text())
    assert {k: result[k] for k in summary["eval"]} == summary["eval"]  # the loaded fusion is the trained one

    def embeddings(*overrides):  # decoded at the tiles' resolution either way, so level 1 sees the same pixels
        spec = parse_spec(config.read_text(), overrides=[f"temporal.checkpoint={head}", f"output.dir={out}",
                                                         "segments.mode=whole", *overrides])
        uris = [json.loads(line)["uri"] for line in (root / "val" / "labels.jsonl").read_text().splitlines()][:3]
        rows = run_sequential(spec, uris, short_side=64).to_pylist()
        return np.stack([r["embedding"] for r in rows if r["kind"] == "segment"])

    # the pipeline fuses the middle frame's views with the trained fusion: not the whole frame alone any more
    # (an untrained attention fusion is exactly the whole frame)
    assert not np.allclose(embeddings(*tower), embeddings(), atol=1e-4)

    refused = reeltag("run", config, *sets)  # no temporal.checkpoint
    assert refused.returncode == 2 and "tower.fusion: attention" in refused.stderr, refused.stderr
    with pytest.raises(ConfigError, match=r"tower.fusion.*levels \[1, 2\]"):  # trained on other views
        check_spec(parse_spec(config.read_text(), overrides=["tower.levels=[1,3]", "tower.fusion=attention",
                                                             f"temporal.checkpoint={head}"]))
