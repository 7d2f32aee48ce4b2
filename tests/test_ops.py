"""keras_kd.ops against float64 NumPy/SciPy references, on this backend."""

import math

import keras
import numpy as np
import pytest
from _cases import (
    NEG_INF,
    cross_entropy64,
    entropy64,
    f32,
    global_pointer64,
    global_pointer_logits,
    global_pointer_two_class64,
    jsd64,
    kl64,
    log_softmax64,
    logit_pairs,
    mlce64,
    sparse_labels,
    symmetric_kl64,
    symmetric_kl_logit_form64,
    teacher_zeros_pair,
)
from scipy import special

from keras_kd import losses
from keras_kd import ops as kd

BACKEND = keras.backend.backend()
RTOL, ATOL = 1e-5, 1e-6
CASES = logit_pairs()
CASE_NAMES = sorted(CASES)

TEACHER = f32([[1, 2, 3], [4, 5, 6]])
STUDENT = f32([[1.2, 2.1, 2.9], [3.8, 5.2, 6.1]])


@pytest.fixture(autouse=True)
def _fresh_session():
    # Overrides the conftest fixture: its gc.collect() costs ~0.5 s a test,
    # and these tests build no models whose memory needs reclaiming.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)


def np_(x):
    return keras.ops.convert_to_numpy(x)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np_(actual), expected, rtol=rtol, atol=atol)


def backend_grad(fn, *args):
    """Gradients of `sum(fn(*args))` by the backend's own autodiff."""
    if BACKEND == "jax":
        import jax

        argnums = tuple(range(len(args)))
        grads = jax.grad(lambda *a: keras.ops.sum(fn(*a)), argnums=argnums)(
            *[keras.ops.convert_to_tensor(a) for a in args]
        )
    elif BACKEND == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        keras.ops.sum(fn(*tensors)).backward()
        grads = [t.grad for t in tensors]
    else:
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = keras.ops.sum(fn(*tensors))
        grads = tape.gradient(value, tensors)
    # an argument outside the differentiable path gets None (torch, TF)
    return [
        np.zeros(np.shape(a)) if g is None else np_(g)
        for a, g in zip(args, grads)
    ]


# ------------------------------------------------ SPEC.md reference values


def test_spec_temperature_case():
    value = losses.KLDivergence(temperature=2.0)(TEACHER, STUDENT)
    assert abs(float(np_(value)) - 0.008507) < 1e-6
    assert abs(float(np_(value)) - kl64(TEACHER, STUDENT, 2.0).mean()) < 5e-7


def test_spec_teacher_distribution():
    p = np.exp(np_(kd.log_probabilities(TEACHER, temperature=2.0)))
    close(p, np.exp(log_softmax64(TEACHER, 2.0)))
    # SPEC prints four decimals; both rows are the same distribution.
    np.testing.assert_allclose(p, [[0.1863, 0.3072, 0.5065]] * 2, atol=5e-5)


def test_spec_probability_case_is_log_1_25():
    p, q = f32([[0.25] * 4 + [0.0]]), f32([[0.2] * 5])
    value = kd.kl_divergence(p, q, from_logits=False)
    assert abs(float(np_(value)[0]) - math.log(1.25)) < 1e-6


def test_spec_probabilities_passed_as_logits_pitfall():
    # The article's code computed KL(softmax(Q) || softmax(P)): probabilities
    # fed to a logit API in the wrong order give 0.004752, not log 1.25.
    p, q = f32([[0.25] * 4 + [0.0]]), f32([[0.2] * 5])
    wrong = float(np_(kd.kl_divergence(q, p))[0])
    assert abs(wrong - 0.004752) < 1e-6
    assert abs(wrong - math.log(1.25)) > 0.2


# ----------------------------------------------------- float64 references


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_kl_divergence(case, temperature):
    t, s = CASES[case]
    close(
        kd.kl_divergence(t, s, temperature=temperature), kl64(t, s, temperature)
    )


def test_kl_divergence_teacher_zeros():
    t, s = teacher_zeros_pair()
    close(kd.kl_divergence(t, s), kl64(t, s))


def test_kl_divergence_probabilities_vs_rel_entr(rng):
    p = special.softmax(rng.normal(size=(5, 7)), axis=-1)
    q = special.softmax(rng.normal(size=(5, 7)), axis=-1)
    p[:, 0] = 0.0
    p /= p.sum(-1, keepdims=True)
    p, q = f32(p), f32(q)
    expected = special.rel_entr(p.astype(float), q.astype(float)).sum(-1)
    close(kd.kl_divergence(p, q, from_logits=False), expected)
    # with a temperature, probabilities are sharpened/softened as p**(1/T)
    close(
        kd.kl_divergence(p, q, from_logits=False, temperature=2.0),
        kl64(p, q, 2.0, from_logits=False),
    )


@pytest.mark.parametrize("case", CASE_NAMES)
def test_entropy_cross_entropy_identity(case):
    t, s = CASES[case]
    h, ce = np_(kd.entropy(t)), np_(kd.cross_entropy(t, s))
    close(h, entropy64(t))
    close(ce, cross_entropy64(t, s))
    close(kd.kl_divergence(t, s), ce - h, atol=1e-4 if "1e4" in case else ATOL)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_symmetric_kl(case, temperature):
    t, s = CASES[case]
    value = kd.symmetric_kl_divergence(t, s, temperature=temperature)
    close(value, symmetric_kl64(t, s, temperature))
    close(kd.symmetric_kl_divergence(s, t, temperature=temperature), np_(value))


@pytest.mark.parametrize("case", ["random", "confident30"])
def test_symmetric_kl_logit_form(case):
    t, s = CASES[case]
    close(kd.symmetric_kl_divergence(t, s), symmetric_kl_logit_form64(t, s))


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("case", CASE_NAMES)
def test_jensen_shannon_interior(case, beta):
    t, s = CASES[case]
    close(kd.jensen_shannon_divergence(t, s, beta), jsd64(t, s, beta))
    value = np_(kd.jensen_shannon_divergence(t, s, 0.5, temperature=2.0))
    close(value, jsd64(t, s, 0.5, 2.0))
    assert np.all(value <= 4.0 * math.log(2.0) + 1e-6)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_jensen_shannon_end_points_are_kl(case):
    t, s = CASES[case]
    np.testing.assert_array_equal(
        np_(kd.jensen_shannon_divergence(t, s, 0.0, temperature=2.0)),
        np_(kd.kl_divergence(t, s, temperature=2.0)),
    )
    np.testing.assert_array_equal(
        np_(kd.jensen_shannon_divergence(t, s, 1.0)),
        np_(kd.kl_divergence(s, t)),
    )
    assert np.all(np_(kd.jensen_shannon_divergence(t, s)) <= math.log(2.0))


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


def test_axis_equals_moving_the_axis():
    t, s = CASES["masked"]
    for fn in (
        kd.kl_divergence,
        kd.symmetric_kl_divergence,
        kd.jensen_shannon_divergence,
        kd.cross_entropy,
    ):
        close(fn(t.T, s.T, axis=0), np_(fn(t, s)))
    labels = f32(t > 0)
    close(
        kd.multilabel_categorical_crossentropy(labels.T, s.T, axis=0),
        np_(kd.multilabel_categorical_crossentropy(labels, s)),
    )


def test_masking_equals_slicing():
    t, s = CASES["masked"]
    keep = np.isfinite(t[0])
    for fn in (
        kd.kl_divergence,
        kd.symmetric_kl_divergence,
        kd.jensen_shannon_divergence,
        kd.global_pointer_kl_divergence,
    ):
        masked = np_(fn(t[:1], s[:1]))
        sliced = np_(fn(t[:1, keep], s[:1, keep]))
        close(masked, sliced)


def test_log_probabilities_fully_masked_row():
    x = f32([[NEG_INF, NEG_INF], [0.0, NEG_INF]])
    np.testing.assert_array_equal(
        np_(kd.log_probabilities(x)), [[NEG_INF, NEG_INF], [0.0, NEG_INF]]
    )


def test_paired_symmetric_kl(rng):
    s = f32(rng.normal(size=(6, 5)))
    value = np_(kd.paired_symmetric_kl_divergence(s))
    pairs = symmetric_kl64(s[0::2], s[1::2])
    close(value, np.repeat(pairs, 2))


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


# ---------------------------------------------------------------- dtypes

DTYPE_FUNCTIONS = {
    "kl": lambda t, s: kd.kl_divergence(t, s, temperature=2.0),
    "symmetric_kl": kd.symmetric_kl_divergence,
    "jsd": kd.jensen_shannon_divergence,
    "cross_entropy": kd.cross_entropy,
    "entropy": lambda t, s: kd.entropy(s),
    "gp": kd.global_pointer_kl_divergence,
    "mlce": lambda t, s: kd.multilabel_categorical_crossentropy(t > 0, s),
}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", sorted(DTYPE_FUNCTIONS))
def test_half_precision_inputs(name, dtype):
    fn = DTYPE_FUNCTIONS[name]
    for case in ("random", "masked"):
        t, s = (keras.ops.convert_to_tensor(x, dtype) for x in CASES[case])
        value = fn(t, s)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        t32, s32 = (keras.ops.cast(x, "float32") for x in (t, s))
        reference = np_(fn(t32, s32))
        close(value, reference, rtol=1e-6, atol=1e-7)
        finite = np.isfinite(reference)
        assert np.all(np.isfinite(np_(value))[finite] | ~finite)


def test_mixed_dtypes():
    t16 = keras.ops.convert_to_tensor(TEACHER, "float16")
    value = kd.kl_divergence(t16, STUDENT, temperature=2.0)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    close(value, kl64(TEACHER, STUDENT, 2.0))
    ints = np.array([[1, 2, 3], [4, 5, 6]], "int32")
    close(kd.kl_divergence(ints, STUDENT), kl64(TEACHER, STUDENT))


# ----------------------------------------------------------------- peers


@pytest.mark.skipif(BACKEND != "torch", reason="torch peer")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
@pytest.mark.parametrize("case", ["random", "confident30"])
def test_agrees_with_torch_kl_div(case, reduction):
    import torch
    import torch.nn.functional as F

    t, s = (torch.tensor(x) for x in CASES[case])
    temp = 2.0
    expected = (
        F.kl_div(
            F.log_softmax(s / temp, -1),
            F.softmax(t / temp, -1),
            reduction=reduction,
        )
        * temp**2
    )
    ours = {"batchmean": "sum_over_batch_size", "sum": "sum"}
    if reduction == "none":
        # torch keeps the class axis; ours sums it away
        expected = expected.sum(-1)
    loss = losses.KLDivergence(
        temperature=temp, reduction=ours.get(reduction, "none")
    )
    close(loss(t, s), expected.numpy(), atol=1e-5)


@pytest.mark.skipif(BACKEND != "jax", reason="optax peer")
@pytest.mark.parametrize("case", ["random", "confident30", "masked"])
def test_agrees_with_optax(case):
    import jax.numpy as jnp
    import optax

    t, s = CASES[case]
    log_q = jnp.asarray(log_softmax64(s), jnp.float32)
    log_p = jnp.asarray(log_softmax64(t), jnp.float32)
    alive = np.isfinite(log_softmax64(s)).any(-1)
    # optax computes 0 * log 0 = NaN at masked entries: exclude them
    where = jnp.asarray(np.isfinite(log_softmax64(t)))
    expected = optax.losses.kl_divergence(log_q, jnp.exp(log_p), where=where)
    ours = np_(kd.kl_divergence(t, s))
    close(ours[alive], np_(expected)[alive])
    if hasattr(optax.losses, "kl_divergence_with_log_targets"):
        expected = optax.losses.kl_divergence_with_log_targets(
            log_q, log_p, where=where
        )
        close(ours[alive], np_(expected)[alive])


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
