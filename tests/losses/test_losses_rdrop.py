"""The R-Drop losses: the value against float64, the consistency term,
row weights, argument checks, and training on interleaved pairs."""

import math

import keras
import numpy as np
import pytest
from _cases import f32, log_softmax64, rdrop64
from _cases_keras import (
    close,
    np_,
)

from keras_kd import losses


def test_rdrop_matches_float64():
    rng = np.random.default_rng(3)
    logits = f32(2.0 * rng.normal(size=(6, 4)))
    labels = rng.integers(0, 4, size=6)
    one_hot = np.eye(4, dtype="float32")[labels]
    for alpha in (0.0, 1.0, 4.0):
        expected = rdrop64(one_hot, logits, alpha)
        dense = losses.RDropCategoricalCrossentropy(alpha, from_logits=True)
        sparse = losses.RDropSparseCategoricalCrossentropy(
            alpha, from_logits=True
        )
        close(dense(one_hot, logits), expected)
        close(sparse(labels, logits), expected)
        close(sparse(labels[:, None], logits), expected)
    probs = np.exp(log_softmax64(logits)).astype("float32")
    close(
        losses.RDropCategoricalCrossentropy(2.0)(one_hot, probs),
        rdrop64(one_hot, probs, 2.0, from_logits=False),
    )


def test_rdrop_identical_pairs_have_no_consistency_term():
    rng = np.random.default_rng(4)
    logits = f32(np.repeat(rng.normal(size=(3, 4)), 2, axis=0))
    labels = np.array([0, 0, 2, 2, 3, 3])
    ce = -log_softmax64(logits)[np.arange(6), labels].mean()
    for alpha in (1.0, 100.0):
        loss = losses.RDropSparseCategoricalCrossentropy(
            alpha, from_logits=True
        )
        close(loss(labels, logits), ce)


def test_rdrop_weights_each_row():
    rng = np.random.default_rng(5)
    logits = f32(rng.normal(size=(4, 3)))
    labels = np.array([0, 0, 1, 1])
    loss = losses.RDropSparseCategoricalCrossentropy(2.0, from_logits=True)
    per_row = np_(
        losses.RDropSparseCategoricalCrossentropy(
            2.0, from_logits=True, reduction="none"
        )(labels, logits)
    )
    assert per_row.shape == (4,)
    close(loss(labels, logits), per_row.mean())
    weights = f32([1, 1, 0, 0])
    close(loss(labels, logits, sample_weight=weights), per_row[:2].sum() / 4)


@pytest.mark.parametrize("value", [-1.0, math.inf])
def test_invalid_alpha(value):
    for cls in (
        losses.RDropCategoricalCrossentropy,
        losses.RDropSparseCategoricalCrossentropy,
    ):
        with pytest.raises(ValueError, match=f"`alpha`.*alpha={value}"):
            cls(alpha=value)


def test_odd_batch_for_rdrop():
    probs = np.full((3, 4), 0.25, "float32")
    with pytest.raises(ValueError, match="pairs"):
        losses.RDropCategoricalCrossentropy()(probs, probs)
    with pytest.raises(ValueError, match="pairs"):
        losses.RDropSparseCategoricalCrossentropy()(np.zeros(3), probs)


def test_fit_with_rdrop_on_interleaved_pairs():
    rng = np.random.default_rng(2)
    x = f32(rng.normal(size=(16, 4)))
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 0)
    x, y = np.repeat(x, 2, axis=0), np.repeat(y, 2, axis=0)
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3),
        ]
    )
    loss = losses.RDropSparseCategoricalCrossentropy(
        alpha=4.0, from_logits=True
    )
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=loss)
    history = model.fit(
        x, y, epochs=8, batch_size=16, shuffle=False, verbose=0
    ).history["loss"]
    assert all(np.isfinite(history))
    assert history[-1] < history[0]
