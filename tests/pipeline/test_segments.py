import numpy as np
import pytest

from pipeline.segments import frame_histograms, plan_segments, plan_spans, sample_fps, sample_uniform, shot_boundaries

W = dict(window_s=4, stride_s=4, min_segment_s=1)


def test_windows_keep_a_long_enough_last_partial_window():
    assert plan_spans(10.0, mode="window", **W) == [(0, 4), (4, 8), (8, 10)]
    assert plan_spans(8.5, mode="window", **W) == [(0, 4), (4, 8)]
    assert plan_spans(3.0, mode="window", **W) == [(0, 3.0)]
    assert plan_spans(10.0, mode="whole", **W) == [(0, 10.0)]


def test_overlapping_windows():
    assert plan_spans(6.0, mode="window", window_s=4, stride_s=2, min_segment_s=1) == [(0, 4), (2, 6)]
    assert plan_spans(7.0, mode="window", window_s=4, stride_s=2, min_segment_s=1) == [(0, 4), (2, 6), (4, 7)]


def test_shots_are_split_into_windows_when_long():
    assert plan_spans(12.0, mode="shots", cuts=[3.0, 10.5], **W) == [(0, 3.0), (3.0, 7.0), (7.0, 10.5), (10.5, 12.0)]


def test_cut_detection_on_hand_built_histograms():
    times = np.arange(10) / 10
    a, b = np.zeros((1, 48)), np.zeros((1, 48))
    a[0, 0] = b[0, 5] = 1.0
    hists = np.concatenate([a.repeat(3, 0), b.repeat(1, 0), a.repeat(6, 0)])  # a one-frame flash at 0.3 s
    assert shot_boundaries(hists, times, threshold=0.35, min_shot_s=0.0) == [0.3, 0.4]
    assert shot_boundaries(hists, times, threshold=0.35, min_shot_s=0.2) == [0.3]  # too close to the previous cut
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    frames[1] = 255
    h = frame_histograms(frames)
    assert h.shape == (2, 48) and h.sum(axis=1) == pytest.approx([1, 1]) and h[0, 0] == h[1, 15] == pytest.approx(1 / 3)


def test_fps_sampling_is_capped():
    times = np.arange(250) / 25.0
    assert sample_fps(times, 0.0, 4.0, 2.0, 32).tolist() == [6, 18, 31, 43, 56, 68, 81, 93]
    assert len(sample_fps(times, 0.0, 10.0, 25.0, 16)) == 16


def test_uniform_sampling_centres_frames_in_equal_parts():
    times = np.arange(100) / 25.0  # 4 s at 25 fps
    # 4 frames over [0, 4): centres at 0.5, 1.5, 2.5, 3.5 s -> frames 12, 37, 62, 87
    assert sample_uniform(times, 0.0, 4.0, 4).tolist() == [12, 37, 62, 87]


def test_sampling_uses_true_times_on_variable_frame_rate():
    # 1 s at 10 fps, then 1 s at 50 fps: the frame on screen at 0.5 s is frame 5, at 1.5 s frame 10 + 25
    times = np.concatenate([np.arange(10) / 10.0, 1.0 + np.arange(50) / 50.0])
    assert sample_uniform(times, 0.0, 2.0, 2).tolist() == [5, 35]
    segments = plan_segments(times, 2.0, mode="window", window_s=1, stride_s=1, min_segment_s=0.5, frames=2)
    assert [(s.start_s, s.end_s) for s in segments] == [(0, 1), (1, 2)]
    assert segments[1].frame_times_s == pytest.approx([1.24, 1.74])
