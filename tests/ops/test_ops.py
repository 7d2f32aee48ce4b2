"""keras_kd.ops softmax divergences against float64 NumPy/SciPy
references, on this backend: values, properties, dtypes and peers."""

import math

import keras
import numpy as np
import pytest
from _cases import (
    NEG_INF,
    cross_entropy64,
    entropy64,
    f32,
    jsd64,
    kl64,
    log_softmax64,
    logit_pairs,
    symmetric_kl64,
    symmetric_kl_logit_form64,
    teacher_zeros_pair,
)
from _cases_keras import (
    ATOL,
    BACKEND,
    close,
    np_,
)
from scipy import special

from keras_kd import losses
from keras_kd import ops as kd

CASES = logit_pairs()
CASE_NAMES = sorted(CASES)

TEACHER = f32([[1, 2, 3], [4, 5, 6]])
STUDENT = f32([[1.2, 2.1, 2.9], [3.8, 5.2, 6.1]])


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
    # float64 with float32 computes in float64 where the backend allows it
    value = kd.symmetric_kl_divergence(TEACHER.astype("float64"), STUDENT)
    close(value, symmetric_kl64(TEACHER, STUDENT))


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


@pytest.mark.parametrize("p", [1, 2, 3])
def test_attention_map_against_numpy(p, rng):
    features = rng.normal(size=(2, 3, 4, 5)).astype("float32")
    energy = np.mean(np.abs(features.astype("float64")) ** p, axis=-1)
    energy = energy.reshape(2, -1)
    expected = energy / np.linalg.norm(energy, axis=-1, keepdims=True)
    actual = np_(kd.attention_map(features, p=p))
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-7)
    # Channels on another axis give the same map.
    moved = np.moveaxis(features, -1, 1)
    np.testing.assert_allclose(
        np_(kd.attention_map(moved, p=p, axis=1)), actual, rtol=1e-6
    )
    # Scale invariance, and finite maps for huge activations.
    huge = np_(kd.attention_map(features * 1e30, p=p))
    np.testing.assert_allclose(huge, actual, rtol=1e-5, atol=1e-7)
