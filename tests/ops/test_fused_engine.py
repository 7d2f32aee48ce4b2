"""The one chunk engine behind every fused linear loss: the dense teacher
and the cached top-k teacher go through the same student-side work, so a
half-precision model computes its logits the same way on both paths (its
products in its own dtype, the softmax math in float32)."""

import keras
import numpy as np
import pytest
from _fused_linear_cases import (
    BACKEND,
    V,
    make_inputs,
    np_,
    reference,
    value_and_grads,
)
from keras import ops

from keras_kd import ops as kd

HALF = [("bfloat16", "bfloat16"), ("bfloat16", "float32")]


def _full_top_k(ht, kt):
    """The float64 teacher of `ht @ kt` cached at k = vocab (empty tail),
    largest first."""
    zt = ht.astype("float64") @ kt[:, :V].astype("float64")
    lp = zt - zt.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    ids = np.argsort(-lp, axis=-1, kind="stable").astype("int32")
    log_probs = np.take_along_axis(lp, ids, -1).astype("float32")
    tail = np.full(lp.shape[:-1], -np.inf, "float32")
    return log_probs, ids, tail


def _half_inputs(dtype, kernel_dtype):
    hs, ks, ht, kt, mask, _ = make_inputs(11)
    return ops.cast(hs, dtype), ops.cast(ks, kernel_dtype), ht, kt, mask


def _as_float64(x):
    return np_(ops.cast(x, "float32")).astype("float64")


@pytest.mark.parametrize("dtype,kernel_dtype", HALF)
def test_top_k_products_are_rounded_like_the_dense_path(dtype, kernel_dtype):
    hs, ks, ht, kt, mask = _half_inputs(dtype, kernel_dtype)
    teacher = _full_top_k(ht, kt)

    def top_k(h, k):
        return kd.fused_linear_top_k_divergence(
            h, k, *teacher, mask=mask, chunk_size=4
        )

    def dense(h, k):
        # A float32 teacher: its logits are the cache's, to float32.
        return kd.fused_linear_divergence(h, k, ht, kt, mask=mask, chunk_size=4)

    value, grads = value_and_grads(top_k, hs, ks)
    dense_value, dense_grads = value_and_grads(dense, hs, ks)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    for grad, wanted in zip(grads, (dtype, kernel_dtype)):
        assert keras.backend.standardize_dtype(grad.dtype) == wanted
    # The student's products rounded to bfloat16 (the matmul's output),
    # then float64: what the dense path computes on eager torch and
    # TensorFlow. A float32 product differs by ~5e-4 of the value here.
    h64 = _as_float64(hs)
    k64 = _as_float64(ops.cast(ks, dtype))
    rounded = _as_float64(ops.cast(ops.convert_to_tensor(h64 @ k64), dtype))
    lq = rounded - rounded.max(-1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(-1, keepdims=True))
    lp = np.zeros_like(lq)
    np.put_along_axis(lp, teacher[1], teacher[0].astype("float64"), -1)
    w = mask / mask.sum()
    exact_rounded = (w * (np.exp(lp) * (lp - lq)).sum(-1)).sum()
    unrounded = reference(h64, k64, ht, kt, mask)[0]
    assert abs(exact_rounded - unrounded) > 1e-4 * abs(unrounded)
    found, from_dense = float(np_(value)), float(np_(dense_value))
    # Both paths give the same value, whichever the backend's rounding.
    assert abs(found - from_dense) <= 1e-5 * abs(from_dense)
    if BACKEND != "jax":
        assert abs(found - exact_rounded) <= 1e-5 * exact_rounded
    else:
        # XLA may keep the products in float32 (it folds the cast back
        # into the matmul), on both paths alike.
        assert any(
            abs(found - wanted) <= 1e-5 * wanted
            for wanted in (exact_rounded, unrounded)
        )
    for grad, wanted in zip(grads, dense_grads):
        wanted = _as_float64(wanted)
        error = _as_float64(grad) - wanted
        # Both rounded to bfloat16 (the kernel's over 4 chunks): vectors.
        assert np.linalg.norm(error) <= 1e-2 * np.linalg.norm(wanted)


@pytest.mark.parametrize("dtype,kernel_dtype", HALF)
def test_top_k_products_run_in_the_hidden_states_dtype(
    dtype, kernel_dtype, monkeypatch
):
    # XLA may fold a bfloat16 product's rounding away (JAX): the dtypes
    # the products are asked for are the robust check on every backend.
    hs, ks, ht, kt, mask = _half_inputs(dtype, kernel_dtype)
    teacher = _full_top_k(ht, kt)
    seen = []
    einsum = ops.einsum

    def spy(equation, *operands):
        seen.append(
            (equation,)
            + tuple(keras.backend.standardize_dtype(x.dtype) for x in operands)
        )
        return einsum(equation, *operands)

    monkeypatch.setattr(keras.ops, "einsum", spy)
    value_and_grads(
        lambda h, k: kd.fused_linear_top_k_divergence(h, k, *teacher),
        hs,
        ks,
    )
    # The logits, the hidden-state and the kernel gradients.
    equations = {entry[0] for entry in seen}
    assert {"ch,hv->cv", "cv,hv->ch", "ch,cv->hv"} <= equations, seen
    assert all(entry[1:] == (dtype, dtype) for entry in seen), seen
