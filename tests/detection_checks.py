"""The `Detector.detect` contract, checked the same way for every detector's tests.

``detect`` returns keras-hub's keys, padded to ``max_detections`` rows per image: ``boxes``
[B, D, 4], ``classes`` [B, D], ``scores`` (and its keras-hub alias ``confidence``) [B, D] and
``num_detections`` [B]. The first ``num_detections[i]`` rows of image i are real detections,
best first; the rest are padding (class -1, score 0, box zeros). docs/design.md describes the
interface.
"""

import numpy as np


def check_detect_contract(out, count, max_detections, num_classes, min_score=None, boxes_in_image=False):
    """Assert that ``out`` (``detect`` of ``count`` images) keeps the contract above.

    ``min_score``: the model's score threshold, which every real detection must reach.
    ``boxes_in_image``: real boxes must lie in [0, 1] (for models that clip them).
    """
    assert out["boxes"].shape == (count, max_detections, 4)
    assert out["classes"].shape == (count, max_detections)
    assert out["scores"].shape == (count, max_detections)
    assert out["num_detections"].shape == (count,)
    np.testing.assert_array_equal(out["confidence"], out["scores"])
    for i in range(count):
        n = int(out["num_detections"][i])
        assert (out["classes"][i, n:] == -1).all() and (out["scores"][i, n:] == 0).all()
        assert (out["boxes"][i, n:] == 0).all()
        assert ((out["classes"][i, :n] >= 0) & (out["classes"][i, :n] < num_classes)).all()
        assert (np.diff(out["scores"][i, :n]) <= 1e-6).all()  # best first
        if min_score is not None:
            assert (out["scores"][i, :n] >= min_score).all()
        if boxes_in_image:
            assert ((out["boxes"][i, :n] >= 0) & (out["boxes"][i, :n] <= 1)).all()
