"""Tests of the span metrics against counts made by hand."""

import keras
import numpy as np
import pytest
from _cases_keras import np_

from keras_kd.metrics import SpanF1, SpanPrecision, SpanRecall

NEG_INF = -np.inf


def batches():
    """Two batches of `[batch=1, heads=2, 3, 3]` logits and labels.

    Batch 1: TP at (0,0,0,1) and (0,1,2,2); FP at (0,0,1,2); FN at
    (0,1,0,0). A positive label at a masked (-inf) entry is ignored.
    Batch 2: TP at (0,0,0,0); FN at (0,0,1,1) and (0,1,0,2); the positive
    logit 0.0 is not above the threshold.
    """
    first = np.full((1, 2, 3, 3), -2.0, "float32")
    first_labels = np.zeros_like(first)
    first[0, 0, 0, 1], first_labels[0, 0, 0, 1] = 3.0, 1.0
    first[0, 1, 2, 2], first_labels[0, 1, 2, 2] = 0.5, 1.0
    first[0, 0, 1, 2] = 1.0
    first_labels[0, 1, 0, 0] = 1.0
    first[0, :, 1, 0] = NEG_INF
    first_labels[0, 0, 1, 0] = 1.0

    second = np.full((1, 2, 3, 3), -1.0, "float32")
    second_labels = np.zeros_like(second)
    second[0, 0, 0, 0], second_labels[0, 0, 0, 0] = 2.0, 1.0
    second_labels[0, 0, 1, 1] = 1.0
    second[0, 1, 0, 2], second_labels[0, 1, 0, 2] = 0.0, 1.0
    return [(first_labels, first), (second_labels, second)]


def test_counts_and_f1_across_batches_match_a_hand_count():
    f1, precision, recall = SpanF1(), SpanPrecision(), SpanRecall()
    for metric in (f1, precision, recall):
        for labels, logits in batches():
            metric.update_state(labels, logits)
    # By hand: TP = 2 + 1, FP = 1 + 0, FN = 1 + 2.
    assert float(np_(f1.true_positives)) == 3.0
    assert float(np_(f1.false_positives)) == 1.0
    assert float(np_(f1.false_negatives)) == 3.0
    np.testing.assert_allclose(np_(f1.result()), 6.0 / 10.0)
    np.testing.assert_allclose(np_(precision.result()), 3.0 / 4.0)
    np.testing.assert_allclose(np_(recall.result()), 3.0 / 6.0)
    f1.reset_state()
    assert float(np_(f1.result())) == 0.0
    assert float(np_(f1.true_positives)) == 0.0


def test_threshold_and_sample_weight():
    (labels, logits), _ = batches()
    metric = SpanF1(threshold=0.75)
    metric.update_state(labels, logits)
    # 0.5 drops below the threshold: TP 1, FP 1, FN 2.
    np.testing.assert_allclose(np_(metric.result()), 2.0 / 5.0)
    metric = SpanF1()
    both = np.concatenate([b[1] for b in batches()])
    both_labels = np.concatenate([b[0] for b in batches()])
    metric.update_state(both_labels, both, sample_weight=np.array([1.0, 0.0]))
    # Only the first example counts: TP 2, FP 1, FN 1.
    np.testing.assert_allclose(np_(metric.result()), 4.0 / 6.0)


def test_sparse_labels_count_like_dense_labels():
    dense, sparse = SpanF1(), SpanF1(sparse=True)
    for labels, logits in batches():
        indices = np.full((1, 2, 3), -1, "int32")
        for _, h, start, end in zip(*np.nonzero(labels)):
            slot = np.argmax(indices[0, h] < 0)
            indices[0, h, slot] = start * 3 + end
        dense.update_state(labels, logits)
        sparse.update_state(indices, logits)
    for name in ("true_positives", "false_positives", "false_negatives"):
        assert float(np_(getattr(sparse, name))) == float(
            np_(getattr(dense, name))
        )
    np.testing.assert_allclose(np_(sparse.result()), 0.6)


def test_config_round_trip_and_registration():
    metric = SpanF1(threshold=0.5, sparse=True, mask_zero=True, name="f")
    clone = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert type(clone) is SpanF1
    assert clone.get_config() == metric.get_config()
    for cls in (SpanPrecision, SpanRecall):
        clone = cls.from_config(cls().get_config())
        assert clone.name == cls().name


def test_invalid_threshold():
    with pytest.raises(ValueError, match="threshold"):
        SpanF1(threshold="0")
