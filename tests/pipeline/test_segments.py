import numpy as np
import pytest

from pipeline.segments import plan_segments, plan_windows, sample_uniform


def test_windows_keep_a_long_enough_last_partial_window():
    assert plan_windows(10.0, mode="window", window_s=4, stride_s=4, min_segment_s=1) == [(0, 4), (4, 8), (8, 10)]
    assert plan_windows(8.5, mode="window", window_s=4, stride_s=4, min_segment_s=1) == [(0, 4), (4, 8)]
    assert plan_windows(3.0, mode="window", window_s=4, stride_s=4, min_segment_s=1) == [(0, 3.0)]
    assert plan_windows(10.0, mode="whole", window_s=4, stride_s=4, min_segment_s=1) == [(0, 10.0)]


def test_overlapping_windows():
    assert plan_windows(6.0, mode="window", window_s=4, stride_s=2, min_segment_s=1) == [(0, 4), (2, 6)]
    assert plan_windows(7.0, mode="window", window_s=4, stride_s=2, min_segment_s=1) == [(0, 4), (2, 6), (4, 7)]


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
