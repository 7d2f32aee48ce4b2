"""keras_kd.ops multi-label functions (GlobalPointer divergence, dense and
sparse multi-label crossentropy) against float64 references."""

import keras
import numpy as np
import pytest
from _cases import (
    NEG_INF,
    f32,
    global_pointer64,
    global_pointer_logits,
    global_pointer_two_class64,
    logit_pairs,
    mlce64,
    sparse_labels,
)
from _cases_keras import (
    backend_grad,
    close,
    np_,
)
from scipy import special

from keras_kd import losses
from keras_kd import ops as kd

CASES = logit_pairs()
CASE_NAMES = sorted(CASES)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("mask_value", [NEG_INF, -1e12])
def test_global_pointer_kl(mask_value, temperature):
    t, s, _ = global_pointer_logits(mask_value=mask_value)
    value = kd.global_pointer_kl_divergence(t, s, temperature=temperature)
    assert tuple(value.shape) == t.shape[:2]
    close(value, global_pointer64(t, s, temperature))
    if temperature == 1.0:
        close(value, global_pointer_two_class64(t, s))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_global_pointer_kl_confident_rank2(case):
    t, s = CASES[case]
    value = kd.global_pointer_kl_divergence(t, s)
    close(value, global_pointer64(t, s, axes=-1))
    finite = ~(np.isneginf(t) | np.isneginf(s))
    t, s = np.where(finite, t, 0), np.where(finite, s, 0)
    # the same value as a sum of 2-class softmax symmetric KLs [x, 0]
    zeros = np.zeros_like(t)
    two_class = kd.symmetric_kl_divergence(
        np.stack([t, zeros], -1), np.stack([s, zeros], -1)
    )
    close(value, np_(keras.ops.sum(two_class, axis=-1)), atol=1e-5)


@pytest.mark.parametrize("mask_value", [NEG_INF, -1e12])
def test_multilabel_crossentropy_global_pointer(mask_value):
    t, s, labels = global_pointer_logits(mask_value=mask_value)
    value = kd.multilabel_categorical_crossentropy(labels, s)
    assert tuple(value.shape) == s.shape[:2]
    close(value, mlce64(labels, s, axes=(-2, -1)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_multilabel_crossentropy(case):
    t, s = CASES[case]
    labels = f32(t > 0)
    close(kd.multilabel_categorical_crossentropy(labels, s), mlce64(labels, s))


def test_multilabel_crossentropy_small_loss_keeps_digits():
    # a well-trained model: the loss is ~1e-9 and must not round to 0
    logits = f32([[20.0, -20.0, -25.0, 22.0]])
    labels = f32([[1, 0, 0, 1]])
    value = np_(kd.multilabel_categorical_crossentropy(labels, logits))
    np.testing.assert_allclose(value, mlce64(labels, logits), rtol=1e-5)
    assert value[0] > 0


@pytest.mark.parametrize("pad", [-1, 0])
def test_sparse_multilabel_matches_dense(pad, rng):
    indices, dense = sparse_labels(pad=pad)
    logits = f32(3.0 * rng.normal(size=dense.shape))
    logits[0, 1, 2] = NEG_INF
    sparse = kd.sparse_multilabel_categorical_crossentropy(
        indices, logits, mask_zero=pad == 0
    )
    close(sparse, np_(kd.multilabel_categorical_crossentropy(dense, logits)))
    close(sparse, mlce64(dense, logits))


@pytest.mark.parametrize("mask_value", [NEG_INF, -1e12])
def test_sparse_multilabel_loss_global_pointer_rank4(mask_value):
    _, s, labels = global_pointer_logits(mask_value=mask_value)
    b, h, n, _ = s.shape
    flat = labels.reshape(b, h, n * n)
    width = int(flat.sum(-1).max()) + 2
    indices = np.full((b, h, width), -1, "int32")
    for i, j in np.ndindex(b, h):
        spans = np.flatnonzero(flat[i, j])
        indices[i, j, : len(spans)] = spans
    indices[0, 0, -1] = indices[0, 0, 0]  # a repeated span counts once
    loss = losses.SparseMultilabelCategoricalCrossentropy(reduction="none")
    value = loss(indices, s)
    assert tuple(value.shape) == (b, h)
    close(value, mlce64(labels, s, axes=(-2, -1)))
    dense = losses.MultilabelCategoricalCrossentropy(reduction="none")
    close(value, np_(dense(labels, s)))


@pytest.mark.parametrize("mask_value", [NEG_INF, -1e12])
def test_global_pointer_gradient_value(mask_value):
    t, s, _ = global_pointer_logits(mask_value=mask_value)
    _, grad = backend_grad(kd.global_pointer_kl_divergence, t, s)
    finite = (t > -1e11) & (s > -1e11)
    t64, s64 = np.where(finite, t, 0.0), np.where(finite, s, 0.0)
    sig = special.expit(s64)
    expected = sig * (1 - sig) * (s64 - t64) + sig - special.expit(t64)
    np.testing.assert_allclose(
        grad, np.where(finite, expected, 0.0), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("mask_value", [NEG_INF, -1e12])
def test_multilabel_gradient_value(mask_value):
    _, s, labels = global_pointer_logits(mask_value=mask_value)
    (grad,) = backend_grad(
        lambda x: kd.multilabel_categorical_crossentropy(labels, x), s
    )
    x = np.where(s > NEG_INF, s, NEG_INF).astype(np.float64)
    pos = labels > 0.5
    neg_terms = np.exp(np.where(pos, NEG_INF, x))
    pos_terms = np.exp(np.where(pos, -x, NEG_INF))
    expected = neg_terms / (1 + neg_terms.sum((-2, -1), keepdims=True))
    expected -= pos_terms / (1 + pos_terms.sum((-2, -1), keepdims=True))
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mask_zero", [False, True])
def test_sparse_multilabel_mask_matches_a_numpy_scatter(mask_zero, rng):
    logits = rng.normal(size=(3, 2, 7)).astype("float32")
    indices = rng.integers(-1, 9, size=(3, 2, 4)).astype("int32")
    expected = np.zeros(logits.shape, bool)
    for row in np.ndindex(indices.shape[:-1]):
        for index in indices[row]:
            # Padding (-1, or 0 with mask_zero) and out-of-range marks none.
            if (1 if mask_zero else 0) <= index < logits.shape[-1]:
                expected[row + (index,)] = True
    mask = np_(kd.sparse_multilabel_mask(indices, logits, mask_zero))
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_sparse_multilabel_mask_checks_shapes():
    with pytest.raises(ValueError, match="must agree on all axes"):
        kd.sparse_multilabel_mask(np.zeros((2, 3), "int32"), np.zeros((3, 5)))
