"""Tests of the GlobalPointer layers: math, masks, losses on their outputs."""

import keras
import numpy as np
import pytest
from _cases_keras import np_
from keras import layers

import keras_kd
from keras_kd.layers import (
    EfficientGlobalPointer,
    GlobalPointer,
    rotary_embedding,
)

IDS = np.array([[3, 1, 4, 1, 5, 0], [9, 2, 6, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def rope_reference(x, max_wavelength=10000.0):
    """RoPE written with complex numbers: feature i of each half is the
    real/imaginary part of one number, rotated by `position * theta_i`."""
    x = x.astype("float64")
    half = x.shape[-1] // 2
    theta = max_wavelength ** (-2.0 * np.arange(half) / (2 * half))
    angles = np.arange(x.shape[1])[:, None] * theta[None, :]
    shape = [1] * x.ndim
    shape[1], shape[-1] = x.shape[1], half
    z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * angles).reshape(
        shape
    )
    return np.concatenate([z.real, z.imag], axis=-1)


def masked_reference(logits, real):
    length = logits.shape[-1]
    keep = real[:, None, :, None] & real[:, None, None, :]
    keep = keep & (np.arange(length)[:, None] <= np.arange(length))
    return np.where(keep, logits, -np.inf)


def dense(layer, x):
    kernel, bias = (np_(w).astype("float64") for w in layer.weights)
    return x.astype("float64") @ kernel + bias


def test_rotary_embedding_matches_the_complex_rotation():
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 8)).astype("float32")
    np.testing.assert_allclose(
        np_(rotary_embedding(x)), rope_reference(x), atol=1e-5
    )


def test_rotary_scores_depend_on_relative_position_only():
    rng = np.random.default_rng(1)
    q = np.tile(rng.normal(size=(1, 1, 16)), (1, 9, 1)).astype("float32")
    k = np.tile(rng.normal(size=(1, 1, 16)), (1, 9, 1)).astype("float32")
    scores = np.einsum(
        "bmd,bnd->bmn",
        np_(rotary_embedding(q)),
        np_(rotary_embedding(k)),
    )[0]
    for offset in range(-8, 9):
        diagonal = np.diagonal(scores, offset)
        np.testing.assert_allclose(diagonal, diagonal[0], atol=1e-4)
    assert np.ptp(np.diagonal(scores, 0)) < np.ptp(scores)


def test_global_pointer_matches_reference_with_keras_mask():
    tokens = keras.Input((None,), dtype="int32")
    embedding = layers.Embedding(10, 6, mask_zero=True)
    head = GlobalPointer(heads=3, head_size=4)
    model = keras.Model(tokens, head(embedding(tokens)))
    logits = np_(model(IDS))
    assert logits.shape == (3, 3, 6, 6)

    h = np_(embedding(IDS))
    projected = dense(head.projection, h).reshape(3, 6, 3, 8)
    q, k = (
        rope_reference(projected[..., :4]),
        rope_reference(projected[..., 4:]),
    )
    expected = np.einsum("bmhd,bnhd->bhmn", q, k) / 2.0
    expected = masked_reference(expected, IDS > 0)
    np.testing.assert_array_equal(np.isneginf(logits), np.isneginf(expected))
    live = np.isfinite(expected)
    assert live.sum() == 3 * (15 + 6)  # upper triangles of lengths 5 and 3
    np.testing.assert_allclose(logits[live], expected[live], atol=1e-5)


def test_efficient_global_pointer_matches_reference():
    head = EfficientGlobalPointer(heads=2, head_size=4)
    h = np.random.default_rng(2).normal(size=(3, 6, 5)).astype("float32")
    logits = np_(head(h, mask=IDS > 0))
    assert logits.shape == (3, 2, 6, 6)

    projected = dense(head.projection, h)
    q, k = (
        rope_reference(projected[..., :4]),
        rope_reference(projected[..., 4:]),
    )
    shared = np.einsum("bmd,bnd->bmn", q, k) / 2.0
    bias = dense(head.type_bias, projected)  # [batch, length, 2 * heads]
    start = bias[..., :2].transpose(0, 2, 1)[:, :, :, None]
    end = bias[..., 2:].transpose(0, 2, 1)[:, :, None, :]
    expected = masked_reference(shared[:, None] + start + end, IDS > 0)
    live = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(logits), live)
    np.testing.assert_allclose(logits[live], expected[live], atol=1e-5)


@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
def test_explicit_mask_input_equals_keras_mask(cls):
    embedding = layers.Embedding(10, 6, mask_zero=True)
    head = cls(heads=2, head_size=4)
    tokens = keras.Input((None,), dtype="int32")
    from_keras_mask = keras.Model(tokens, head(embedding(tokens)))

    features = keras.Input((None, 6))
    padding = keras.Input((None,), dtype="bool")
    from_input = keras.Model([features, padding], head(features, mask=padding))

    h = np_(embedding(IDS))
    a = np_(from_keras_mask(IDS))
    b = np_(from_input([h, IDS > 0]))
    np.testing.assert_array_equal(a, b)
    # The mask is spent on -inf entries: none is passed on.
    assert getattr(from_keras_mask.outputs[0], "_keras_mask", None) is None
    assert np.isneginf(a[2]).all()  # an all-padding row is fully masked
    assert np.isfinite(a[0, :, 0, :5]).all()


def test_lower_triangle_kept_on_request():
    head = GlobalPointer(heads=1, head_size=4, mask_lower_triangle=False)
    logits = np_(head(np.ones((1, 4, 3), "float32")))
    assert np.isfinite(logits).all()
    head = GlobalPointer(heads=1, head_size=4, use_rope=False)
    logits = np_(head(np.ones((1, 4, 3), "float32")))
    assert np.isneginf(logits[0, 0][np.tril_indices(4, -1)]).all()
    assert np.isfinite(logits[0, 0][np.triu_indices(4)]).all()


def span_model(cls):
    tokens = keras.Input((None,), dtype="int32")
    x = layers.Embedding(10, 8, mask_zero=True)(tokens)
    return keras.Model(tokens, cls(heads=2, head_size=4)(x))


def span_labels():
    labels = np.zeros((3, 2, 6, 6), "float32")
    labels[0, 0, 0, 2] = labels[0, 1, 3, 4] = labels[1, 0, 1, 1] = 1.0
    labels[1, 1, 2, 1] = 1.0  # start > end: masked, must be ignored
    return labels


@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
def test_masked_spans_never_make_loss_or_gradients_nan(cls):
    model = span_model(cls)
    mlce = keras_kd.losses.MultilabelCategoricalCrossentropy(reduction=None)
    gpkl = keras_kd.losses.GlobalPointerKLDivergence(reduction=None)

    def both_losses(labels, logits):
        # The divergence against a finite "teacher" built from the labels.
        return mlce(labels, logits) + gpkl(3.0 * labels - 1.0, logits)

    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=both_losses)
    logs = model.train_on_batch(IDS, span_labels(), return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0
    # A NaN gradient anywhere would have turned some weight into NaN.
    for weight in model.weights:
        assert np.isfinite(np_(weight)).all(), weight.path


def test_sparse_and_dense_multilabel_crossentropy_agree():
    logits = span_model(GlobalPointer)(IDS)
    labels = span_labels()
    dense = keras_kd.losses.MultilabelCategoricalCrossentropy(reduction=None)
    sparse = keras_kd.losses.SparseMultilabelCategoricalCrossentropy(
        reduction=None
    )
    indices = np.full((3, 2, 3), -1, "int32")
    for b, h, start, end in zip(*np.nonzero(labels)):
        slot = np.argmax(indices[b, h] < 0)
        indices[b, h, slot] = start * 6 + end
    a, b = np_(dense(labels, logits)), np_(sparse(indices, logits))
    assert a.shape == b.shape == (3, 2)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("cls", [GlobalPointer, EfficientGlobalPointer])
def test_config_round_trip_and_saving(cls, tmp_path):
    head = cls(heads=3, head_size=6, use_rope=False, max_wavelength=500)
    clone = cls.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    registered = keras.saving.get_registered_object(f"keras_kd>{cls.__name__}")
    assert registered is cls

    model = span_model(cls)
    path = str(tmp_path / "span.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(np_(loaded(IDS)), np_(model(IDS)))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="heads"):
        GlobalPointer(heads=0, head_size=4)
    with pytest.raises(ValueError, match="head_size"):
        EfficientGlobalPointer(heads=2, head_size=5)
    assert GlobalPointer(heads=2, head_size=5, use_rope=False).head_size == 5
