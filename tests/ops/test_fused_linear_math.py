"""keras_kd.ops.fused_linear_*: values and gradients (w.r.t. the
student's hidden states and kernel) against the dense float64 NumPy
computation and the backend's autodiff of the dense keras-kd ops: every
divergence and temperature, near and far from the teacher, confident
logits, float64, the cross-entropy and the combined loss."""

import keras
import numpy as np
import pytest
from _fused_linear_cases import (
    DIVERGENCES,
    HS,
    HT,
    NOT_ENDS,
    VT,
    B,
    L,
    V,
    _dyadic,
    check,
    close,
    fused,
    make_inputs,
    np_,
    reference,
    value_and_grads,
    x64,
)
from keras import ops

from keras_kd import ops as kd

PATHS = [True, False]  # precise, fast


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("precise", PATHS)
def test_divergence_matches_dense_reference(
    divergence, beta, temperature, precise
):
    hs, ks, ht, kt, mask, _ = make_inputs()
    fn = fused(
        ht,
        kt,
        mask=mask,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        chunk_size=4,
        precise=precise,
    )
    expected = reference(hs, ks, ht, kt, mask, divergence, beta, temperature)
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("scale", [0.05, 0.3])
@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_divergence_at_every_distance(divergence, beta, scale):
    # Smaller logits: rows near the teacher (KL(Q || P) < 1), where the
    # divergences take their series path.
    hs, ks, ht, kt, mask, _ = make_inputs(20)
    ks, kt = ks * scale, kt * scale
    fn = fused(
        ht,
        kt,
        mask=mask,
        divergence=divergence,
        beta=beta,
        temperature=2.0,
        chunk_size=4,
        precise=True,
    )
    expected = reference(hs, ks, ht, kt, mask, divergence, beta, 2.0)
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
@pytest.mark.parametrize("precise", PATHS)
def test_gradients_equal_autodiff_of_dense_keras_kd(divergence, beta, precise):
    # The closed-form gradients against the backend's autodiff of the
    # dense keras-kd ops on materialized logits, all in float64.
    with x64():
        hs, ks, ht, kt, mask, _ = make_inputs(1, "float64")
        kt = kt[:, :V]

        def dense(h, k):
            zs, zt = ops.matmul(h, k), ops.matmul(ht, kt)
            if divergence == "reverse_kl":
                zs, zt = zt, zs
            if divergence == "jsd":
                d = kd.jensen_shannon_divergence(zt, zs, beta, temperature=2.0)
            else:
                d = kd.kl_divergence(zt, zs, temperature=2.0)
            w = ops.convert_to_tensor(mask.astype("float64"))
            return ops.sum(d * w) / ops.sum(w)

        fn = fused(
            ht,
            kt,
            mask=mask,
            divergence=divergence,
            beta=beta,
            temperature=2.0,
            chunk_size=3,
            precise=precise,
        )
        value, grads = value_and_grads(dense, hs, ks)
        check(fn, (hs, ks), [np_(x) for x in (value, *grads)], rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 13, 14, 100, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hs, ks, ht, kt, mask, _ = make_inputs(2)
    fn = fused(ht, kt, mask=mask, chunk_size=chunk_size, temperature=2.0)
    check(fn, (hs, ks), reference(hs, ks, ht, kt, mask, temperature=2.0))


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
@pytest.mark.parametrize("precise", PATHS)
def test_float64_in_float64_out(divergence, beta, precise):
    with x64():
        hs, ks, ht, kt, mask, labels = make_inputs(10, "float64")
        expected = reference(hs, ks, ht, kt, mask, divergence, beta, 2.0)
        fn = fused(
            ht,
            kt,
            mask=mask,
            divergence=divergence,
            beta=beta,
            temperature=2.0,
            chunk_size=4,
            precise=precise,
        )
        value, grads = check(fn, (hs, ks), expected, rtol=1e-12)
        for x in (value, *grads):
            assert keras.backend.standardize_dtype(x.dtype) == "float64"


# ---------------------------------------------------------------- accuracy


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_student_close_to_teacher_is_exact(divergence, beta, temperature):
    # Dyadic inputs: every float32 matmul is exact, so the float64
    # reference is the truth. The student differs from the teacher by
    # 2**-14 on a few kernel entries: divergences of ~1e-9.
    rng = np.random.default_rng(12)
    hs = _dyadic(rng, (B, L, HS), 1.0, -3, 4)
    kt = _dyadic(rng, (HS, V), 2.0**-4, -32, 33)
    ks = kt.copy()
    ks[rng.integers(0, HS, 6), rng.integers(0, V, 6)] += 2.0**-14
    fn = fused(
        hs,
        kt,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        chunk_size=4,
        precise=True,
    )
    expected = reference(hs, ks, hs, kt, None, divergence, beta, temperature)
    assert 0 < expected[0] < 1e-7
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_fast_path_near_the_teacher_keeps_its_bound(divergence, beta):
    # The default (fast) path on the case above: not relatively exact, but
    # never negative and within the fast path's absolute bound
    # 1e-5 T**2 (1 + E|log P| + E|log Q|) of every divergence in keras-kd.
    rng = np.random.default_rng(12)
    hs = _dyadic(rng, (B, L, HS), 1.0, -3, 4)
    kt = _dyadic(rng, (HS, V), 2.0**-4, -32, 33)
    ks = kt.copy()
    ks[rng.integers(0, HS, 6), rng.integers(0, V, 6)] += 2.0**-14
    fn = fused(hs, kt, divergence=divergence, beta=beta, temperature=3.0)
    value = float(np_(fn(hs, ks)))
    wanted = reference(hs, ks, hs, kt, None, divergence, beta, 3.0)[0]
    logits = (hs @ kt).astype("float64") / 3.0
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scale = 1.0 + 2.0 * float(np.mean((-np.exp(log_p) * log_p).sum(-1)))
    assert value >= 0.0
    assert abs(value - wanted) <= 1e-5 * 9.0 * scale


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
@pytest.mark.parametrize("precise", PATHS)
def test_confident_logits_are_exact(divergence, beta, precise):
    # Teacher logits beyond +-1e3, student beyond +-1e2 (dyadic: exact).
    rng = np.random.default_rng(13)
    hs = _dyadic(rng, (B, L, HS), 1.0, -3, 4)
    ht = _dyadic(rng, (B, L, HT), 1.0, -3, 4)
    ks = _dyadic(rng, (HS, V), 2.0**-2, -128, 129)
    kt = _dyadic(rng, (HT, VT), 2.0**-2, -1024, 1025)
    assert np.abs(ht @ kt).max() > 1e3 and np.abs(hs @ ks).max() > 1e2
    fn = fused(
        ht,
        kt,
        divergence=divergence,
        beta=beta,
        chunk_size=4,
        precise=precise,
    )
    expected = reference(hs, ks, ht, kt, None, divergence, beta)
    assert expected[0] > 0.5
    check(fn, (hs, ks), expected)


# ------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_dense_reference():
    hs, ks, ht, kt, mask, labels = make_inputs(14)

    def fn(h, k):
        return kd.fused_linear_cross_entropy(
            h, k, labels, mask=mask, chunk_size=3, student_logit_soft_cap=2.0
        )

    expected = reference(
        hs, ks, ht, kt, mask, labels=labels, alpha=1.0, caps=(2.0, None)
    )
    check(fn, (hs, ks), expected)


def test_cross_entropy_out_of_range_labels():
    hs, ks, _, _, mask, labels = make_inputs(15)
    for bad in (-1, V):
        wrong = labels.copy()
        wrong[tuple(np.argwhere(mask)[0])] = bad
        value, grads = value_and_grads(
            lambda h, k: kd.fused_linear_cross_entropy(h, k, wrong, mask),
            hs,
            ks,
        )
        assert np.isnan(np_(value)) and np.isnan(np_(grads[1])).all()
    ignored = labels.copy()
    ignored[~mask] = -100
    close(
        kd.fused_linear_cross_entropy(hs, ks, ignored, mask),
        np_(kd.fused_linear_cross_entropy(hs, ks, labels, mask)),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_is_both_terms_from_one_pass(temperature):
    hs, ks, ht, kt, mask, labels = make_inputs(16)
    kwargs = dict(
        mask=mask,
        alpha=0.3,
        divergence="jsd",
        beta=0.3,
        temperature=temperature,
        chunk_size=4,
    )

    def fn(h, k):
        return kd.fused_linear_distillation_loss(h, k, ht, kt, labels, **kwargs)

    expected = reference(
        hs, ks, ht, kt, mask, "jsd", 0.3, temperature, labels, alpha=0.3
    )
    check(fn, (hs, ks), expected)
    loss, ce, div = kd.fused_linear_distillation_loss(
        hs, ks, ht, kt, labels, return_components=True, **kwargs
    )
    close(ce, reference(hs, ks, ht, kt, mask, labels=labels, alpha=1.0)[0])
    close(div, reference(hs, ks, ht, kt, mask, "jsd", 0.3, temperature)[0])
    close(loss, 0.3 * np_(ce) + 0.7 * np_(div))
