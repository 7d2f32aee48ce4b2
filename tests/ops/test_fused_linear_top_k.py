"""keras_kd.ops.fused_linear_top_k: a linear head's top-k log-probabilities,
their ids and the log of its remaining mass, against a float64 NumPy
reference (temperatures, soft caps, both kernel layouts, padded
vocabularies, an empty tail, a tail far below float32's resolution), and
its argument errors."""

import keras
import numpy as np
import pytest
from _fused_linear_cases import (
    HS,
    VT,
    B,
    L,
    V,
    make_inputs,
    np_,
    x64,
)
from keras import ops

from keras_kd import ops as kd


def _logsumexp(z):
    top = np.max(z, axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf: an empty tail
        total = np.log(np.exp(z - top).sum(-1, keepdims=True))
    return np.squeeze(top + total, -1)


def reference(hidden, kernel, k, t=1.0, cap=None, vocab=None, vh=False):
    """float64 `(top-k log-probs, ids, log of the rest)` of
    `softmax(cap(hidden @ kernel[:, :vocab]) / t)`."""
    kernel = np.asarray(kernel, "float64")
    kernel = kernel.T if vh else kernel
    z = np.asarray(hidden, "float64") @ kernel[:, :vocab]
    if cap is not None:
        z = cap * np.tanh(z / cap)
    lp = z / t - _logsumexp(z / t)[..., None]
    ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    return np.take_along_axis(lp, ids, -1), ids, _logsumexp(rest)


def check(found, expected, rtol=1e-5):
    log_probs, ids, tail = (np_(x) for x in found)
    want_lp, want_ids, want_tail = expected
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(log_probs, want_lp, rtol=rtol, atol=rtol)
    # -inf (an empty tail) exactly, else to the same relative accuracy.
    np.testing.assert_allclose(tail, want_tail, rtol=rtol, atol=rtol)


@pytest.mark.parametrize(
    "k,t,cap,vh,chunk",
    [
        (1, 1.0, None, False, None),
        (4, 2.0, None, True, 3),
        (3, 0.5, 2.0, False, 4),
        (V - 1, 1.0, 3.0, True, 5),
    ],
)
def test_matches_the_float64_reference(k, t, cap, vh, chunk):
    hs, ks, _, _, _, _ = make_inputs(30)
    kernel = ks.T.copy() if vh else ks
    found = kd.fused_linear_top_k(
        hs,
        kernel,
        k,
        temperature=t,
        chunk_size=chunk,
        kernel_layout="vh" if vh else "hv",
        logit_soft_cap=cap,
    )
    assert tuple(found[0].shape) == (B, L, k)
    assert tuple(found[2].shape) == (B, L)
    check(found, reference(hs, kernel, k, t, cap, vh=vh))


def test_k_equal_to_the_vocabulary_leaves_an_empty_tail():
    hs, ks, _, _, _, _ = make_inputs(31)
    log_probs, ids, tail = kd.fused_linear_top_k(hs, ks, V, chunk_size=4)
    assert np.all(np_(tail) == -np.inf)
    every_id = np.broadcast_to(np.arange(V), (B, L, V))
    np.testing.assert_array_equal(np.sort(np_(ids), -1), every_id)
    total = np.exp(np_(log_probs).astype("float64")).sum(-1)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    check((log_probs, ids, tail), reference(hs, ks, V))


def test_a_padded_vocabulary_uses_its_first_entries():
    _, _, ht, kt, _, _ = make_inputs(32)
    found = kd.fused_linear_top_k(ht, kt, 3, vocabulary_size=V)
    assert np.all(np_(found[1]) < V)
    check(found, reference(ht, kt, 3, vocab=V))
    tied = kd.fused_linear_top_k(
        ht, kt.T.copy(), 3, kernel_layout="vh", vocabulary_size=V
    )
    check(tied, reference(ht, kt, 3, vocab=V))
    # The whole padded head is another distribution.
    check(kd.fused_linear_top_k(ht, kt, 3), reference(ht, kt, 3, vocab=VT))


def test_a_tail_far_below_float32_resolution_is_exact():
    # Confident logits: the top 2 hold all but ~1e-40 of the mass, where
    # log1p(-sum p) would give -inf or garbage.
    rng = np.random.default_rng(33)
    hs = (rng.normal(size=(3, HS)) * 30).astype("float32")
    ks = rng.normal(size=(HS, V)).astype("float32")
    expected = reference(hs, ks, 2)
    assert np.all(expected[2] < -20)
    check(kd.fused_linear_top_k(hs, ks, 2), expected)


def test_temperature_as_a_tensor_and_float64_inputs():
    hs, ks, _, _, _, _ = make_inputs(34)
    t = keras.Variable(1.5)
    check(
        kd.fused_linear_top_k(hs, ks, 4, temperature=t),
        reference(hs, ks, 4, 1.5),
    )
    with x64():
        h64, k64 = hs.astype("float64"), ks.astype("float64")
        found = kd.fused_linear_top_k(h64, k64, 4, temperature=1.5)
        for x in (found[0], found[2]):
            assert keras.backend.standardize_dtype(x.dtype) == "float64"
        check(found, reference(h64, k64, 4, 1.5), rtol=1e-12)


def test_half_precision_hidden_states_give_float32_results():
    hs, ks, _, _, _, _ = make_inputs(35)
    found = kd.fused_linear_top_k(ops.cast(hs, "bfloat16"), ks, 3)
    for x in (found[0], found[2]):
        assert keras.backend.standardize_dtype(x.dtype) == "float32"
    rounded = np_(ops.cast(ops.cast(hs, "bfloat16"), "float32"))
    # The products in bfloat16: the logits to ~3 significant digits.
    lp = reference(
        rounded, np_(ops.cast(ops.cast(ks, "bfloat16"), "float32")), 3
    )
    np.testing.assert_allclose(np_(found[0]), lp[0], atol=0.05)


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"k": 0}, "k"),
        ({"k": V + 1}, "k"),
        ({"k": 2.0}, "k"),
        ({"vocabulary_size": V + 1}, "vocabulary_size"),
        ({"vocabulary_size": 0}, "vocabulary_size"),
        ({"k": 5, "vocabulary_size": 4}, "k"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"kernel_layout": "vv"}, "kernel_layout"),
        ({"kernel_layout": "vh"}, "kernel"),
        ({"logit_soft_cap": -1.0}, "logit_soft_cap"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, name):
    hs, ks, _, _, _, _ = make_inputs(36)
    kwargs = {"k": 2, **kwargs}
    with pytest.raises(ValueError, match=f"argument `{name}`"):
        kd.fused_linear_top_k(hs, ks, **kwargs)
