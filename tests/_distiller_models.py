"""Tiny models, data and numpy references shared by the Distiller tests."""

import keras
import numpy as np
from keras import layers

FEATURES = 8
CLASSES = 4


def mlp(hidden, name, batch_norm=False, dropout=0.0, **dense_kwargs):
    """A functional `[batch, 8] -> [batch, 4]` logits model."""
    inputs = keras.Input((FEATURES,), name="x")
    h = layers.Dense(hidden, activation="relu", **dense_kwargs)(inputs)
    if batch_norm:
        h = layers.BatchNormalization()(h)
    if dropout:
        h = layers.Dropout(dropout)(h)
    outputs = layers.Dense(CLASSES, **dense_kwargs)(h)
    return keras.Model(inputs, outputs, name=name)


def pair(**kwargs):
    return mlp(16, "teacher", **kwargs), mlp(8, "student", **kwargs)


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FEATURES)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,)).astype("int32")
    return x, y


def sparse_ce():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def weights_of(model):
    return [np.array(w) for w in model.get_weights()]


def assert_weights_equal(a, b, atol=0.0):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        if atol == 0.0:
            np.testing.assert_array_equal(u, v)
        else:
            np.testing.assert_allclose(u, v, atol=atol, rtol=0)
