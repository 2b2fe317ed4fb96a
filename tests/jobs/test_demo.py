"""The demo model end to end: the committed models/synthactions tags freshly generated SynthActions clips
through the real pipeline, and `reeltag demo` runs offline. The floors here are well below the benchmark's
(benchmarks/demo_model.py) so that they hold on any small set; they fail for a random or broken model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from encoders.video_text import decode_short_side
from jobs.demo import MODEL, caption_embeddings, demo_spec, score_rows, score_run, truth_of
from jobs.run import run_pipeline
from pipeline.stages import run_sequential
from pipeline.synth import MOTIONS, SPLITS, sample_clips, write_clips
from tests.conftest import REPO

TILES = ("tower.levels=[1,2]", "tower.fusion=attention", f"temporal.checkpoint={MODEL / 'tiles'}")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthactions")
    write_clips(root / "actions", sample_clips(36, seed=777, **SPLITS["actions"]))
    write_clips(root / "small", sample_clips(24, seed=778, **SPLITS["small"]))
    write_clips(root / "moving", sample_clips(96, seed=776, **dict(SPLITS["actions"], motions=MOTIONS[:4])))
    return root


@pytest.mark.slow
def test_the_demo_model_tags_held_out_clips_right(held_out, tmp_path):
    spec = demo_spec(held_out / "actions", tmp_path / "out")
    summary = run_pipeline(spec)
    assert summary["videos_ok"] == 36 and summary["videos_failed"] == 0
    scores = score_run(spec.output.dir, truth_of(held_out / "actions" / "labels.jsonl"), caption_embeddings(spec))
    assert scores["segments"] == 36
    assert scores["colour"] >= 0.85 and scores["shape"] >= 0.6 and scores["motion"] >= 0.8, scores  # chance 0.33
    assert scores["text_to_video_R@1"] >= 0.6, scores  # chance: about 1/30


@pytest.mark.slow
def test_mean_pooling_cannot_tell_directions_apart(held_out, tmp_path):
    """96 clips moving left, right, up or down (48 a pair: a standard error of 0.07 around chance; the 12 a pair of
    the actions clips left 0.14: the retrained model read up/down on 11 of 12 of them, 0.50 on 240 in the benchmark)."""
    spec = demo_spec(held_out / "moving", tmp_path / "out", "temporal.pooling=mean", "temporal.checkpoint=null")
    rows = [r for r in run_sequential(spec, sorted(map(str, (held_out / "moving").glob("*.mp4"))),
                                      short_side=decode_short_side(spec)).to_pylist() if r["kind"] == "segment"]
    scores = score_rows(rows, truth_of(held_out / "moving" / "labels.jsonl"), caption_embeddings(spec))
    assert scores["colour"] >= 0.85, scores  # what a frame shows is still there
    assert scores["left/right"] <= 0.8 and scores["up/down"] <= 0.8, scores  # order is not: ~0.5


@pytest.mark.slow
def test_small_shapes_colour_is_seen_whole_frame_and_in_tiles(held_out):
    """The `small` split (shapes 2-4% of the short side): trained with the `tiny` split, the model names their colour
    from the whole frame; with tower levels [1, 2] each tile gets a region tag with its box, and the best tile's
    colour is right far above chance (0.25)."""
    truth = truth_of(held_out / "small" / "labels.jsonl")
    uris = sorted(truth)
    scores = {}
    for name, overrides in (("[1]", ["tower.levels=[1]"]), ("[1,2]", ["tower.levels=[1,2]", "tower.fusion=mean"]),
                            ("trained", [*TILES])):
        spec = demo_spec(held_out / "small", "/nonexistent", *overrides)
        rows = [r for r in run_sequential(spec, uris, short_side=decode_short_side(spec)).to_pylist()
                if r["kind"] == "segment"]
        scores[name] = score_rows(rows, truth)
        assert name == "[1]" or all(len(r["region_tags"]) == 4 for r in rows)  # the 2x2 tiles, each with a box
    assert scores["[1]"]["colour"] >= 0.75, scores
    assert "tile_colour" not in scores["[1]"] and scores["[1,2]"]["tile_colour"] >= 0.4, scores
    # the fusion trained for these tiles (models/synthactions/tiles) reads them without losing the motion
    assert scores["trained"]["colour"] >= 0.85 and scores["trained"]["motion"] >= 0.8, scores


@pytest.mark.slow
def test_the_trained_tile_fusion_keeps_what_the_whole_frame_knows(held_out, tmp_path):
    """Mean fusion averages background tiles into every frame (motion suffers); the trained fusion does not."""
    spec = demo_spec(held_out / "actions", tmp_path / "out", *TILES)
    rows = [r for r in run_sequential(spec, sorted(map(str, (held_out / "actions").glob("*.mp4"))),
                                      short_side=decode_short_side(spec)).to_pylist() if r["kind"] == "segment"]
    scores = score_rows(rows, truth_of(held_out / "actions" / "labels.jsonl"))
    assert scores["colour"] >= 0.85 and scores["shape"] >= 0.6 and scores["motion"] >= 0.8, scores


@pytest.mark.slow
def test_demo_runs_offline(tmp_path):
    result = subprocess.run([sys.executable, "-m", "jobs.cli", "demo", "--dir", str(tmp_path / "demo")],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "7 ok, 1 failed" in out and "notes.mp4  error (decode, unreadable)" in out
    right = int(out.split("accuracy: ")[1].split("/")[0])
    # 7 clips, none on plain grey, the smallest a 15% shape (~22 px in the 144 px view); the accuracy floors are
    # held by the tests above, on 60 + 48 clips
    assert right == 7 and "colour 100%" in out and "motion 100%" in out, out
    assert 'search "a red circle moving left"' in out
    report = Path(out.split("report: ")[1].split()[0])
    assert report.is_file() and report.stat().st_size > 10_000



def test_int8_gives_the_demo_model_the_same_tags():
    """The committed demo model, int8 against fp32 (model.dtype: auto picks int8 on x86 CPUs), on the demo's clips
    and 36 held-out SynthActions clips: the same best tag on every one."""
    import numpy as np

    from encoders.video_text import create_model
    from jobs.demo import DEMO_CLIPS
    from pipeline.config import load_spec
    from pipeline.synth import render

    spec = load_spec(REPO / "configs" / "demo.yaml")
    models = {dtype: create_model(spec, dtype=dtype, device="cpu") for dtype in ("float32", "int8")}
    differ = []
    for clip in [*DEMO_CLIPS, *sample_clips(36, seed=779, **SPLITS["actions"])]:
        frames = render(clip)
        idx = ((np.arange(3) + 0.5) * len(frames) / 3).astype(int)
        tags = {d: m.encode([frames[idx]], [idx / clip.fps])[0]["tags"][0]["label"] for d, m in models.items()}
        differ += [clip] if tags["float32"] != tags["int8"] else []
    # identical: the least fp32 gap between the best and second tag here is 0.116, int8 moves a score by 0.027 at
    # most (the previous stage-2 model had one near tie, a red circle shrinking that int8 called a triangle)
    assert differ == [], differ


@pytest.fixture(scope="module")
def independent(tmp_path_factory):
    """Clips and long videos of the evaluation-only renderer (benchmarks/eval_render.py: PIL, other shades and
    backgrounds, the ffmpeg CLI): never trained on."""
    import shutil

    if shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg CLI is not installed (make test installs it with apt-get)")
    sys.path.insert(0, str(REPO / "benchmarks"))
    import eval_render

    root = tmp_path_factory.mktemp("independent")
    eval_render.write_scenes(root / "clips", eval_render.scenes(48, seed=4242))
    eval_render.write_long(root / "long", eval_render.long_videos(2, seed=4343))
    return root


@pytest.mark.slow
def test_the_demo_model_names_what_another_renderer_drew(independent):
    spec = demo_spec(independent / "clips", "/nonexistent")
    rows = [r for r in run_sequential(spec, sorted(map(str, (independent / "clips").glob("*.mp4"))),
                                      short_side=decode_short_side(spec)).to_pylist() if r["kind"] == "segment"]
    scores = score_rows(rows, truth_of(independent / "clips" / "labels.jsonl"), caption_embeddings(spec))
    assert scores["segments"] == 48
    print(f"\nindependent renderer, 48 clips: {scores}")
    # the committed model reaches 1.00 / 0.90 / 1.00 / 1.00 here (the 5-epoch one before it: shape 0.92; the stage-1
    # base, trained on grey backgrounds only: 0.56 / 0.56 / 0.60 / 0.45); floors below that, far above chance
    # (0.25 / 0.33 / 0.17 / 0.03)
    assert scores["colour"] >= 0.85 and scores["shape"] >= 0.7, scores
    assert scores["motion"] >= 0.85 and scores["text_to_video_R@1"] >= 0.6, scores


@pytest.mark.slow
def test_actions_in_long_videos_are_found_with_their_extent(independent, tmp_path):
    """Two 45-90 s videos, 3-5 actions each among background (one with a drifting grey blob): localised windows,
    then each caption searched: the moments found overlap the true 4 s at IoU >= 0.5."""
    import json

    from jobs.run import save_config
    from jobs.search import search
    from pipeline.writer import OutputWriter

    out = tmp_path / "out"
    out.mkdir()
    spec = demo_spec(independent / "long", out, "segments.mode=window", "segments.localize=true")
    save_config(out, spec, "h")
    writer = OutputWriter(out, config_hash="h", model=spec.model_id())
    writer.add(run_sequential(spec, sorted(map(str, (independent / "long").glob("*.mp4"))),
                              short_side=decode_short_side(spec)))
    writer.flush()
    truth = [json.loads(line) for line in open(independent / "long" / "actions.jsonl")]
    found = 0
    for t in truth:
        moments = [m for m in truth if m["caption"] == t["caption"]]
        results = search(out, t["caption"], top_k=len(moments))["results"]
        overlap = [min(r["end_s"], t["end_s"]) - max(r["start_s"], t["start_s"]) for r in results
                   if str(Path(r["uri"]).resolve()) == t["uri"]]
        found += any(o / (4.0 + (r["end_s"] - r["start_s"]) - o) >= 0.5
                     for o, r in zip(overlap, [r for r in results if str(Path(r["uri"]).resolve()) == t["uri"]]))
    assert found >= 0.7 * len(truth), (found, len(truth))  # the 5-epoch model: all; the base: 6 of 7
