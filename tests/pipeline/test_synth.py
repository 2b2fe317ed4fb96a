import json
import os
from dataclasses import replace

import numpy as np
import pytest

from pipeline.synth import MOTIONS, SMALL, Clip, render, sample_clips, write_clips

REVERSES = [("moving left", "moving right"), ("moving up", "moving down"), ("growing", "shrinking")]


@pytest.mark.parametrize("a,b", REVERSES)
def test_paired_motions_are_each_others_time_reverse(a, b):
    kwargs = dict(colour="blue", shape="triangle", travel=0.6, offset=-0.2, noise=10.0, seed=3)
    assert np.array_equal(render(Clip(motion=a, **kwargs)), render(Clip(motion=b, **kwargs))[::-1])


def test_sampled_clips_are_deterministic_balanced_and_varied():
    clips = sample_clips(24, seed=5)
    assert clips == sample_clips(24, seed=5) and clips != sample_clips(24, seed=6)
    assert [c.motion for c in clips[:6]] == list(MOTIONS)
    assert len({c.travel for c in clips}) == 24 and len({c.crf for c in clips}) > 3
    assert all(18 <= c.crf <= 30 and -0.3 <= c.offset <= 0.3 and 24 <= c.fps <= 30 for c in clips)


def test_small_split_objects_are_2_to_4_percent_of_the_short_side():
    for clip in sample_clips(8, seed=0, size=SMALL, noise=(0.0, 0.0), motions=MOTIONS[:4]):  # constant size
        first = render(clip)[0]
        painted = (first != 128).any(axis=-1)
        ys, xs = np.nonzero(painted)
        extent = max(np.ptp(ys), np.ptp(xs)) + 1
        assert 0.01 * min(clip.width, clip.height) <= extent <= 0.05 * min(clip.width, clip.height) + 2


def test_write_clips_writes_videos_and_a_manifest(tmp_path):
    manifest = write_clips(tmp_path, sample_clips(2, seed=1, duration_s=(1.0, 1.0)))
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert [r["caption"] for r in rows] == [f"a {r['colour']} {r['shape']} {r['motion']}" for r in rows]
    assert all((tmp_path / f"{i:04d}.mp4").stat().st_size > 0 for i in range(2))
    assert {"uri", "start_s", "end_s", "travel", "offset", "crf"} <= rows[0].keys()


def test_the_varied_split_varies_what_the_issue_names_and_keeps_every_label():
    from pipeline.synth import COLOURS, SPLITS, TEXTURES, render

    clips = sample_clips(300, seed=4, **SPLITS["varied"])
    assert {c.texture for c in clips} == set(TEXTURES) and {c.antialias for c in clips} == {True, False}
    assert min(c.background for c in clips) < 45 and max(c.background for c in clips) > 205
    sides = [s for c in clips for s in (c.width, c.height)]
    assert 64 <= min(sides) < 80 and 500 < max(sides) <= 640
    aspects = [c.width / c.height for c in clips]
    assert 9 / 16 - 0.02 <= min(aspects) < 0.7 and 1.9 < max(aspects) <= 21 / 9 + 0.02
    for clip in clips[:40]:
        shade = np.clip(np.array(COLOURS[clip.colour]) + clip.shade, 0, 255)
        # a shade stays its colour: the channels that make the colour stay well above the others
        assert {"red": shade[0] > max(shade[1], shade[2]) + 60, "green": shade[1] > max(shade[0], shade[2]) + 40,
                "blue": shade[2] > max(shade[0], shade[1]) + 40,
                "yellow": min(shade[0], shade[1]) > shade[2] + 60 and abs(shade[0] - shade[1]) < 90}[clip.colour], \
            clip
        frames = render(clip)
        assert frames.shape[1:] == (clip.height, clip.width, 3)
    # the other splits draw exactly the clips they drew before the varied split existed
    assert sample_clips(3, seed=4, **SPLITS["actions"])[0].background == 128.0


def test_a_panning_camera_moves_the_background_and_not_the_shape():
    kwargs = dict(colour="red", shape="square", motion="moving right", width=96, height=64, fps=10.0, size=0.2,
                  texture="noise", texture_amp=30.0, texture_scale=0.3, seed=5)
    still, panned = render(Clip(**kwargs)), render(Clip(**kwargs, pan=(0.5, -0.25)))  # 32 px left, 16 px down
    red = np.all(panned == still, axis=-1) & (still[..., 0] > 180) & (still[..., 1] < 60)
    assert red[0].sum() == red[-1].sum() > 100  # the whole square, where it was without the camera moving
    first, last = panned[0].astype(int), panned[-1].astype(int)
    away = np.ones((64, 96), bool)  # pixels away from the square in both frames
    for frame in (0, -1):
        ys, xs = np.nonzero(red[frame])
        away[ys.min() - 2:ys.max() + 3, xs.min() - 34:xs.max() + 3] = False
    assert np.array_equal(last[16:, :64][away[16:, :64]], first[:48, 32:][away[16:, :64]])
    assert not np.array_equal(first[16:, :64], last[:48, 32:])  # not the same texture throughout


def test_a_distractor_is_colourless_moves_and_stays_behind_the_shape():
    clip = Clip("blue", "circle", "moving left", width=96, height=64, fps=10.0, size=0.4, distractor="square",
                distractor_level=200.0, distractor_size=0.5, distractor_path=(0.5, 0.5, 0.2, 0.5))
    frames, plain = render(clip), render(Clip("blue", "circle", "moving left", width=96, height=64, fps=10.0,
                                              size=0.4))
    blue = np.all(plain == np.array([40, 60, 230]), axis=-1)
    assert np.array_equal(frames[blue], plain[blue])  # the shape in front, everywhere it is
    grey = np.all(frames == 200, axis=-1)
    assert grey[0].sum() > 100 and grey[-1].sum() > 100
    assert np.nonzero(grey[-1])[1].mean() < np.nonzero(grey[0])[1].mean() - 15  # it drifts left


def test_the_varied_split_pans_distracts_and_draws_more_small_shapes():
    from pipeline.synth import SHAPES, SPLITS

    clips = sample_clips(600, seed=7, **SPLITS["varied"])
    panning = [c for c in clips if c.pan != (0.0, 0.0)]
    distracted = [c for c in clips if c.distractor != "none"]
    assert 150 < len(panning) < 250 and 150 < len(distracted) < 250
    assert {c.distractor for c in distracted} == set(SHAPES)
    speeds = [np.hypot(*c.pan) / c.duration_s for c in panning]  # short sides a second
    assert 0.03 <= min(speeds) < 0.05 and 0.1 < max(speeds) <= 0.12
    sizes = np.array([c.size for c in clips])
    assert 0.08 <= sizes.min() and sizes.max() <= 0.45 and 0.2 < np.mean(sizes < 0.125) < 0.35  # uniform: 0.1


def test_the_empty_split_is_the_varied_scenes_with_no_shape_in_them():
    from pipeline.synth import EMPTY, SPLITS

    clips = sample_clips(60, seed=8, **SPLITS["empty"])
    assert {c.caption for c in clips} == {EMPTY} and {c.shape for c in clips} == {"none"}
    assert any(c.pan != (0.0, 0.0) for c in clips) and any(c.distractor != "none" for c in clips)
    for clip in clips[:12]:
        frames = render(clip).astype(int)
        colour = np.abs(frames - frames.mean(-1, keepdims=True)).max()
        # nothing but the tinted background, its texture and noise, and a colourless distractor
        assert colour < 120, (clip, colour)
    # the same scene with a shape: only the shape's pixels differ
    empty, shaped = render(clips[0]), render(replace(clips[0], shape="square", size=0.4))
    differ = np.any(empty != shaped, axis=-1).mean(axis=(1, 2))
    assert np.all(differ > 0.5 * 0.4 ** 2 * min(clips[0].width, clips[0].height) / max(clips[0].width,
                                                                                        clips[0].height))
    assert np.all(differ < 0.4 ** 2 * 1.3)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to compare against 1")
def test_written_clips_are_the_same_bytes_whatever_cores_the_machine_has(tmp_path):
    """PyAV's libx264 defaults to slice threads, one slice per core the encoding thread may run on (x264 reads the
    affinity): a 640x360 clip came out as other bytes on 1 CPU than on 2 until synth asked for one thread."""
    from pipeline.synth import write_video

    frames = render(Clip("red", "circle", "moving left", width=640, height=360, fps=10.0, duration_s=1.0))
    cpus = os.sched_getaffinity(0)
    written = []
    try:
        for allowed in ({min(cpus)}, cpus):
            os.sched_setaffinity(0, allowed)
            written.append(write_video(tmp_path / f"{len(allowed)}.mp4", frames, fps=10).read_bytes())
    finally:
        os.sched_setaffinity(0, cpus)
    assert written[0] == written[1]
