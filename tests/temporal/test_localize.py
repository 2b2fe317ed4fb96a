import numpy as np
import pytest

from temporal.localize import localize, multiscale_windows, nms, temporal_iou


def test_multiscale_windows_cover_the_video_at_each_scale():
    w = multiscale_windows(10.0, (2.0, 4.0, 8.0))
    by_scale = {s: [(a, b) for a, b, sc in w if sc == s] for s in (2.0, 4.0, 8.0)}
    assert by_scale[2.0][:3] == [(0, 2), (1, 3), (2, 4)] and by_scale[2.0][-1] == (8, 10)
    assert by_scale[4.0] == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert by_scale[8.0] == [(0, 8), (2, 10)]
    assert multiscale_windows(3.0, (4.0,)) == [(0.0, 3.0, 4.0)]


def test_iou_and_nms():
    spans = np.array([[0, 4], [1, 5], [6, 8], [0.5, 4.5]])
    assert temporal_iou((0, 4), spans).tolist() == pytest.approx([1.0, 0.6, 0.0, 3.5 / 4.5])
    assert nms(spans, np.array([0.9, 0.8, 0.7, 0.95]), iou=0.5) == [3, 2]


def test_localize_an_action_in_a_hand_built_score_curve():
    # 2 s windows every 1 s over 20 s; the action is at 8-12 s: windows inside it score high
    spans = np.array([[s, s + 2] for s in range(19)], dtype=float)
    scores = np.array([0.1] * 19)
    scores[[7, 8, 9, 10, 11]] = [0.6, 0.9, 0.95, 0.85, 0.55]
    scores[15] = 0.7  # a second, short detection
    # 2 s windows one second apart overlap by 1/3 (< the NMS IoU), so the windows above threshold merge
    assert localize(spans, scores, threshold=0.5) == [(7.0, 13.0, 0.95), (15.0, 17.0, 0.7)]
    assert localize(spans, scores, threshold=0.8) == [(8.0, 12.0, 0.95)]
    assert localize(spans, scores, threshold=0.99) == []
    assert localize(spans, scores, threshold=0.5, gap_s=2.0) == [(7.0, 17.0, 0.95)]
