import numpy as np
import pytest

from temporal.metrics import average_precision, mean_average_precision, retrieval, top1


def test_retrieval_on_a_hand_checked_ranking():
    video = np.eye(4)
    # query 0 ranks clips 0 > 1 > ...: relevant clip 0 first (rank 1); query 1 finds its clip 3 at rank 3
    text = np.array([[1.0, 0.5, 0.2, 0.0], [0.9, 0.8, 0.0, 0.1], [0.0, 0.0, 0.0, 0.0]])
    relevant = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=bool)
    out = retrieval(video, text, relevant, ks=(1, 2, 5))
    # query 2 ties everywhere: stable order puts clip 2 at rank 3
    assert out == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(1 / 3), "R@5": 1.0, "median_rank": 3.0}


def test_top1_and_average_precision():
    assert top1(np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), np.array([1, 0, 0])) == pytest.approx(2 / 3)
    # ranking: pos, neg, pos -> precision at hits 1/1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision(np.array([0.9, 0.5, 0.4]), np.array([True, False, True])) == pytest.approx(5 / 6)
    scores = np.array([[0.9, 0.1], [0.5, 0.6], [0.4, 0.2]])
    positive = np.array([[True, False], [False, True], [True, False]])
    assert mean_average_precision(scores, positive) == pytest.approx((5 / 6 + 1.0) / 2)
