"""Gradients of keras_kd.ops by the backend's own autodiff: finite where
targets are zero or logits masked, and equal to analytic values."""

import keras
import numpy as np
import pytest
from _cases import (
    NEG_INF,
    f32,
    global_pointer_logits,
    jsd64,
    log_softmax64,
    logit_pairs,
    teacher_zeros_pair,
)
from _cases_keras import (
    backend_grad,
)

from keras_kd import ops as kd

CASES = logit_pairs()


# ------------------------------------------------------------- gradients

GRAD_FUNCTIONS = {
    "kl": kd.kl_divergence,
    "symmetric_kl": kd.symmetric_kl_divergence,
    "jsd": kd.jensen_shannon_divergence,
    "jsd_beta0.2": lambda t, s: kd.jensen_shannon_divergence(t, s, 0.2),
    "gp": kd.global_pointer_kl_divergence,
    "mlce": lambda t, s: kd.multilabel_categorical_crossentropy(t > 0, s),
}


@pytest.mark.parametrize("name", sorted(GRAD_FUNCTIONS))
def test_gradients_finite_with_masks(name):
    fn = GRAD_FUNCTIONS[name]
    inputs = [CASES["masked"], CASES["confident1e4"]]
    if name in ("kl", "mlce", "gp"):
        inputs.append(teacher_zeros_pair())
    if name in ("mlce", "gp"):
        for mask_value in (NEG_INF, -1e12):
            inputs.append(global_pointer_logits(mask_value=mask_value)[:2])
    for t, s in inputs:
        for grad in backend_grad(fn, t, s):
            assert np.all(np.isfinite(grad)), name


def test_kl_gradient_with_zero_probability_target():
    t, s = teacher_zeros_pair()
    p = np.exp(log_softmax64(t)).astype("float32")
    q = np.exp(log_softmax64(s)).astype("float32")
    grads = backend_grad(
        lambda a, b: kd.kl_divergence(a, b, from_logits=False), p, q
    )
    assert all(np.all(np.isfinite(g)) for g in grads)
    # q is renormalized, so d KL / d q = 1 - p / q: 1 where the target is 0
    np.testing.assert_allclose(grads[1], 1 - p / q, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("case", ["random", "confident30", "masked"])
def test_kl_gradient_value(case, temperature):
    t, s = CASES[case]
    _, grad = backend_grad(
        lambda a, b: kd.kl_divergence(a, b, temperature=temperature), t, s
    )
    # d/ds T**2 KL(softmax(t/T) || softmax(s/T)) = T (softmax(s/T) - p)
    p = np.exp(log_softmax64(t, temperature))
    q = np.exp(log_softmax64(s, temperature))
    np.testing.assert_allclose(grad, temperature * (q - p), atol=1e-6)


@pytest.mark.parametrize("case", ["random", "confident30", "masked"])
def test_symmetric_kl_gradient_value(case):
    t, s = CASES[case]
    _, grad = backend_grad(kd.symmetric_kl_divergence, t, s)
    lp, lq = log_softmax64(t), log_softmax64(s)
    p, q = np.exp(lp), np.exp(lq)
    both = (lp > NEG_INF) & (lq > NEG_INF)
    d = np.where(both, np.where(both, lq, 0) - np.where(both, lp, 0), 0)
    expected = q * (d - (q * d).sum(-1, keepdims=True)) + q - p
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-5)


def test_jsd_gradient_matches_finite_differences(rng):
    t, s = f32(rng.normal(size=(5, 7))), f32(rng.normal(size=(5, 7)))
    _, grad = backend_grad(
        lambda a, b: kd.jensen_shannon_divergence(a, b, 0.3), t, s
    )
    h, expected = 1e-6, np.zeros(s.shape)
    for idx in np.ndindex(*s.shape):
        up, down = s.astype(np.float64), s.astype(np.float64)
        up[idx] += h
        down[idx] -= h
        expected[idx] = (jsd64(t, up, 0.3) - jsd64(t, down, 0.3)).sum() / 2 / h
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


def test_clipped_peer_gives_no_gradient_where_ours_does():
    # keras.losses.KLDivergence clips probabilities at 1e-7: a confidently
    # wrong student gets (almost) no gradient from it.
    t, s = f32([[30.0, 0.0, -30.0]]), f32([[0.0, 0.0, 30.0]])
    peer = keras.losses.KLDivergence(reduction="none")
    _, peer_grad = backend_grad(
        lambda a, b: peer(keras.ops.softmax(a), keras.ops.softmax(b)), t, s
    )
    assert np.abs(peer_grad).max() < 1e-6
    _, grad = backend_grad(kd.kl_divergence, t, s)
    np.testing.assert_allclose(grad, [[-1.0, 0.0, 1.0]], atol=1e-6)


def test_gp_gradient_exact_at_zero_and_equal_logits():
    # Kinks of abs/min in an earlier formula gave wrong gradients exactly at
    # s == 0 and s == t (zero-initialised heads hit both).
    s = f32([[0.0, 0.0, 1.5, -2.0, 0.0, 7.0, -40.0]])
    t = f32([[0.5, -3.0, 1.5, 3.0, 0.0, -7.0, 20.0]])
    grad_t, grad_s = backend_grad(kd.global_pointer_kl_divergence, t, s)
    s64, t64 = s.astype(np.float64), t.astype(np.float64)
    sig_s, sig_t = 1 / (1 + np.exp(-s64)), 1 / (1 + np.exp(-t64))
    # d/ds (sig(s) - sig(t)) (s - t) = sig(s)(1 - sig(s))(s - t) + gap
    expected_s = sig_s * (1 - sig_s) * (s64 - t64) + (sig_s - sig_t)
    expected_t = -sig_t * (1 - sig_t) * (s64 - t64) - (sig_s - sig_t)
    np.testing.assert_allclose(grad_s, expected_s, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_t, expected_t, rtol=1e-5, atol=1e-7)


def test_kl_fully_masked_teacher_row_contributes_zero():
    # The fast path makes such a row uniform to stay finite; it must still
    # count as "no mass" (regression: it once gave 0.309).
    t = f32([[NEG_INF, NEG_INF, NEG_INF], [1.0, 2.0, 3.0]])
    s = f32([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    for temperature in (1.0, 2.0):
        grads = backend_grad(
            lambda a, b: kd.kl_divergence(a, b, temperature=temperature), t, s
        )
        assert all(np.all(np.isfinite(g)) for g in grads)
        value = keras.ops.convert_to_numpy(
            kd.kl_divergence(t, s, temperature=temperature)
        )
        np.testing.assert_allclose(value, [0.0, 0.0], atol=1e-7)
    p = f32([[0.0, 0.0, 0.0], [0.2, 0.3, 0.5]])
    q = f32([[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]])
    value = keras.ops.convert_to_numpy(
        kd.kl_divergence(p, q, from_logits=False)
    )
    np.testing.assert_allclose(value, [0.0, 0.0], atol=1e-7)


@pytest.mark.parametrize("precise", [False, True])
def test_global_pointer_masked_entries_have_zero_value_and_gradient(precise):
    t, s, _ = global_pointer_logits(mask_value=NEG_INF)
    masked = np.isneginf(t)
    # One side masked only counts as masked too.
    s[0, 0, 0, 1], t[0, 0, 1, 2] = NEG_INF, NEG_INF
    masked[0, 0, 0, 1] = masked[0, 0, 1, 2] = True

    def per_entry(t_, s_):
        return kd.global_pointer_kl_divergence(t_, s_, axis=-1, precise=precise)

    grad_t, grad_s = backend_grad(per_entry, t, s)
    np.testing.assert_array_equal(grad_s[masked], 0.0)
    np.testing.assert_array_equal(grad_t[masked], 0.0)
    assert np.all(np.isfinite(grad_s)) and np.all(grad_s[~masked] != 0.0)
    t_open, s_open = np.where(masked, 0.0, t), np.where(masked, 0.0, s)
    expected = kd.global_pointer_kl_divergence(
        t_open, s_open, axis=-1, precise=precise
    )
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(per_entry(t, s)),
        keras.ops.convert_to_numpy(expected),
        rtol=1e-6,
    )
