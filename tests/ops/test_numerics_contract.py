"""The numeric contract of keras_kd.ops under hostile input: logits at the
ends of the float32 range, NaN rows, empty batches, float64 inputs.

Every value is compared with a float64 NumPy/SciPy reference on the same
float32-rounded inputs (`_cases.py`)."""

import math

import keras
import numpy as np
import pytest
from _cases import (
    NEG_INF,
    cross_entropy64,
    dkd64,
    entropy64,
    extreme_pairs,
    f32,
    jsd64,
    kl64,
    log_softmax64,
    symmetric_kl64,
)
from _cases_keras import (
    backend_grad,
    engine_path,  # noqa: F401 (each test runs on both paths)
    np_,
)

from keras_kd import losses
from keras_kd import ops as kd

pytestmark = pytest.mark.usefixtures("engine_path")

EXTREME = extreme_pairs()
FLOAT32_MAX = float(np.finfo(np.float32).max)


def _agree(actual, expected, rtol=1e-5, atol=0.0):
    """`actual` matches the float64 truth: NaN where it is NaN, and to
    `rtol` where it is within the float32 range. Beyond it, a finite truth
    (a log-probability near -6.8e38 read at weight 1) comes out as at least
    the float32 maximum, and an infinite one (mass where the other input
    has none) as +inf or at least 1e37 (the documented "huge value": the
    missing mass, here >= 1/3, times 3.4e38)."""
    actual = np.asarray(np_(actual), np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(actual), nan)
    infinite = np.isinf(expected)
    assert np.all(actual[infinite] * np.sign(expected[infinite]) >= 1e37)
    beyond = ~nan & ~infinite & (np.abs(expected) > FLOAT32_MAX)
    assert np.all(np.abs(actual[beyond]) >= FLOAT32_MAX * (1 - 1e-6))
    assert np.all(np.sign(actual[beyond]) == np.sign(expected[beyond]))
    rest = ~nan & ~infinite & ~beyond
    np.testing.assert_allclose(
        actual[rest], expected[rest], rtol=rtol, atol=atol
    )


# ------------------------------------- 1. logits near the float32 limit


@pytest.mark.parametrize("temperature", [1.0, 2.5, 1000.0])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_kl_exact_near_float32_limit(case, temperature):
    # Regression: at T = 1, `x - max` overflowed and KL was NaN for
    # finite logits (e.g. 3e38 for [3e38, 0, -3e38] vs [0, 0, 3e38]).
    t, s = EXTREME[case]
    atol = 1e-6 * temperature**2
    value = kd.kl_divergence(t, s, temperature=temperature)
    _agree(value, kl64(t, s, temperature), atol=atol)


def test_issue_values_near_float32_limit():
    expected = {
        "opposite_3e38": 3e38,
        "opposite_2e38_vs_zeros": math.log(2.0),
        "identical_3e38": 0.0,
        "masked_1e32_identical": 0.0,
        "masked_1e32_vs_zeros": math.log(3.0),
        "masked_1e32_vs_masked": math.log(2.0),
    }
    for case, truth in expected.items():
        t, s = EXTREME[case]
        value = float(np_(kd.kl_divergence(t, s))[0])
        assert value == pytest.approx(truth, rel=1e-6, abs=1e-7), case


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_other_divergences_near_float32_limit(case, temperature):
    t, s = EXTREME[case]
    lp_s = log_softmax64(s, temperature)
    atol = 1e-6 * temperature**2
    for beta in (0.3, 0.5):
        value = kd.jensen_shannon_divergence(
            t, s, beta, temperature=temperature
        )
        _agree(value, jsd64(t, s, beta, temperature), atol=atol)
    _agree(kd.entropy(t, temperature=temperature), entropy64(t, temperature))
    # Values that read a log-probability below the float32 range (about
    # -3.4e38) are huge but only bounded (see the `_log_softmax` docstring):
    # checked where every log-probability is in range.
    in_range = np.all((lp_s >= -FLOAT32_MAX) | (lp_s == NEG_INF))
    lp_t = log_softmax64(t, temperature)
    in_range &= np.all((lp_t >= -FLOAT32_MAX) | (lp_t == NEG_INF))
    if in_range:
        _agree(
            kd.kl_divergence(s, t, temperature=temperature),
            kl64(s, t, temperature),
            atol=atol,
        )
        _agree(
            kd.symmetric_kl_divergence(t, s, temperature=temperature),
            symmetric_kl64(t, s, temperature),
            atol=atol,
        )
        _agree(
            kd.cross_entropy(t, s, temperature=temperature),
            cross_entropy64(t, s, temperature),
        )


def test_log_probability_below_float_range_is_bounded():
    # The documented corner: log P = -4e38 is below float32's lowest value
    # and counts as -3.4e38. The reverse KL (true 2e38) is finite, huge,
    # never NaN, and within a factor 2.
    t, s = EXTREME["opposite_2e38_vs_zeros"]
    value = float(np_(kd.kl_divergence(s, t))[0])
    truth = kl64(s, t)[0]
    assert truth / 2 <= value <= truth


@pytest.mark.parametrize("temperature", [1.0, 2.5, 1000.0])
@pytest.mark.parametrize("case", sorted(EXTREME))
def test_log_probabilities_near_float32_limit(case, temperature):
    t, _ = EXTREME[case]
    expected = log_softmax64(t, temperature)
    # at or below the lowest float32 a log-probability reads -inf (the
    # engine's "no mass" value)
    expected = np.where(expected <= -FLOAT32_MAX, NEG_INF, expected)
    actual = np_(kd.log_probabilities(t, temperature=temperature))
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", sorted(EXTREME))
def test_gradients_finite_near_float32_limit(case):
    # Finite wherever the value is finite (a value that overflows the
    # float32 range has a gradient that does too).
    t, s = EXTREME[case]
    for fn in (
        kd.kl_divergence,
        kd.symmetric_kl_divergence,
        kd.jensen_shannon_divergence,
        lambda a, b: kd.kl_divergence(b, a, temperature=2.5),
    ):
        if not np.all(np.isfinite(np_(fn(t, s)))):
            continue
        for grad in backend_grad(fn, t, s):
            assert np.all(np.isfinite(grad)), case


def test_kl_gradient_near_float32_limit():
    # d KL / d s = softmax(s) - softmax(t), exact also at 2e38
    t, s = EXTREME["opposite_2e38_vs_zeros"]
    _, grad = backend_grad(kd.kl_divergence, t, s)
    np.testing.assert_allclose(grad, [[-0.5, 0.5]], atol=1e-7)


# -------------------------------------------------- 2. NaN propagation

# rows: clean; NaN in the teacher; NaN in the student; teacher fully
# masked; teacher fully masked and a NaN student; a masked entry in both;
# a NaN beside a masked entry
NAN_T = f32(
    [
        [1.0, 2.0, 3.0, 0.5],
        [1.0, np.nan, 3.0, 0.5],
        [1.0, 2.0, 3.0, 0.5],
        [NEG_INF] * 4,
        [NEG_INF] * 4,
        [1.0, NEG_INF, 3.0, 0.5],
        [NEG_INF, 2.0, np.nan, 0.5],
    ]
)
NAN_S = f32(
    [
        [0.5, 2.5, 1.0, 0.0],
        [0.5, 2.5, 1.0, 0.0],
        [0.5, 2.5, np.nan, 0.0],
        [0.5, 2.5, 1.0, 0.0],
        [np.nan, 2.5, 1.0, 0.0],
        [0.5, NEG_INF, 1.0, 0.0],
        [0.5, 2.5, 1.0, NEG_INF],
    ]
)
NAN_ROWS = np.isnan(NAN_T).any(-1) | np.isnan(NAN_S).any(-1)

NAN_FUNCTIONS = {
    "kl": (kd.kl_divergence, kl64),
    "reverse_kl": (
        lambda t, s: kd.kl_divergence(s, t, temperature=2.0),
        lambda t, s: kl64(s, t, 2.0),
    ),
    "symmetric_kl": (kd.symmetric_kl_divergence, symmetric_kl64),
    "jsd": (kd.jensen_shannon_divergence, lambda t, s: jsd64(t, s, 0.5)),
    "jsd_beta0": (
        lambda t, s: kd.jensen_shannon_divergence(t, s, 0.0),
        kl64,
    ),
    "jsd_beta1": (
        lambda t, s: kd.jensen_shannon_divergence(t, s, 1.0),
        lambda t, s: kl64(s, t),
    ),
    "cross_entropy": (kd.cross_entropy, cross_entropy64),
    "entropy": (lambda t, s: kd.entropy(t), lambda t, s: entropy64(t)),
    "entropy_student": (lambda t, s: kd.entropy(s), lambda t, s: entropy64(s)),
}


@pytest.mark.parametrize("name", sorted(NAN_FUNCTIONS))
def test_nan_rows_give_nan(name):
    # Regression: a NaN teacher row gave KL 0, a NaN student row reverse
    # KL 0; Keras' losses and torch's F.kl_div give NaN.
    fn, reference = NAN_FUNCTIONS[name]
    value = np_(fn(NAN_T, NAN_S))
    uses_student = name != "entropy"
    uses_teacher = name != "entropy_student"
    nan = np.zeros(len(NAN_T), bool)
    if uses_teacher:
        nan |= np.isnan(NAN_T).any(-1)
    if uses_student:
        nan |= np.isnan(NAN_S).any(-1)
    expected = np.full(len(NAN_T), np.nan)
    expected[~nan] = reference(NAN_T[~nan], NAN_S[~nan])
    _agree(value, expected, atol=1e-6)


def test_nan_log_probabilities_row():
    value = np_(kd.log_probabilities(NAN_T))
    assert np.all(np.isnan(value[np.isnan(NAN_T).any(-1)]))
    clean = ~np.isnan(NAN_T).any(-1)
    np.testing.assert_allclose(
        value[clean], log_softmax64(NAN_T[clean]), rtol=1e-6
    )
    probs = np.exp(log_softmax64(NAN_S[:2]))
    probs[1, 0] = np.nan
    value = np_(kd.kl_divergence(f32(probs), f32(probs), from_logits=False))
    assert value[0] == 0.0 and np.isnan(value[1])


def test_masked_rows_stay_finite_next_to_nan_rows():
    # masked entries still contribute 0 and fully masked rows 0
    value = np_(kd.kl_divergence(NAN_T, NAN_S))
    assert value[3] == 0.0
    assert np.isfinite(value[5])
    t, s = NAN_T[[0, 3, 5]], NAN_S[[0, 3, 5]]
    for grad in backend_grad(kd.kl_divergence, t, s):
        assert np.all(np.isfinite(grad))


def test_nan_global_pointer_and_multilabel():
    t = f32([[1.0, -1e12, NEG_INF, 2.0], [1.0, -1e12, NEG_INF, 2.0]])
    s = f32([[0.5, -1e12, NEG_INF, -1.0], [0.5, -1e12, NEG_INF, -1.0]])
    labels = f32([[1, 0, 1, 0], [1, 0, 1, 0]])
    clean = [
        np_(kd.global_pointer_kl_divergence(t, s))[0],
        np_(kd.multilabel_categorical_crossentropy(labels, s))[0],
    ]
    assert all(np.isfinite(clean))
    for i, j in [(0, 0), (0, 2), (1, 2)]:
        bad = s.copy()
        bad[1, j] = np.nan
        inputs = (t, bad) if i == 0 else (bad, t)
        gp = np_(kd.global_pointer_kl_divergence(*inputs))
        assert gp[0] == pytest.approx(clean[0], rel=1e-6) and np.isnan(gp[1])
        mlce = np_(kd.multilabel_categorical_crossentropy(labels, bad))
        assert mlce[0] == pytest.approx(clean[1], rel=1e-6)
        assert np.isnan(mlce[1])
    nan_labels = labels.copy()
    nan_labels[1, 0] = np.nan
    mlce = np_(kd.multilabel_categorical_crossentropy(nan_labels, s))
    assert np.isnan(mlce[1]) and mlce[0] == pytest.approx(clean[1], rel=1e-6)
    # a NaN label on a masked entry is ignored, like any label there
    nan_labels = labels.copy()
    nan_labels[1, 2] = np.nan
    mlce = np_(kd.multilabel_categorical_crossentropy(nan_labels, s))
    np.testing.assert_allclose(mlce, [clean[1]] * 2, rtol=1e-6)
    indices = np.array([[0, -1], [3, -1]], "int32")
    sparse = np_(kd.sparse_multilabel_categorical_crossentropy(indices, bad))
    assert np.isnan(sparse[1]) and np.isfinite(sparse[0])


def test_nan_decoupled_kd_and_rdrop():
    # Regression: DKD of a NaN teacher row was 0.
    t, s = NAN_T[[0, 1, 2, 0]], NAN_S[[0, 1, 2, 0]]
    t[3, 1] = np.nan  # NaN exactly at the target: NCKD drops that logit
    labels = np.array([1, 0, 3, 1])
    tckd, nckd, dkd = dkd64(t[:1], s[:1], labels[:1], 1.0, 8.0, 2.0)
    for fn, clean in (
        (kd.target_class_kd, tckd),
        (kd.non_target_class_kd, nckd),
        (lambda *a: kd.decoupled_kd(*a[:3], 1.0, 8.0, a[3]), dkd),
    ):
        value = np_(fn(t, s, labels, 2.0))
        assert np.all(np.isnan(value[1:])), fn
        np.testing.assert_allclose(value[:1], clean, rtol=1e-5, atol=1e-6)
    logits = f32(np.random.default_rng(3).normal(size=(6, 4)))
    logits[2, 1] = np.nan
    for loss in (
        losses.RDropSparseCategoricalCrossentropy(
            2.0, from_logits=True, reduction="none"
        ),
        losses.RDropCategoricalCrossentropy(
            2.0, from_logits=True, reduction="none"
        ),
    ):
        labels = np.array([0, 0, 1, 1, 3, 3])
        if isinstance(loss, losses.RDropCategoricalCrossentropy):
            labels = np.eye(4, dtype="float32")[labels]
        value = np_(loss(labels, logits))
        # the pair (2, 3) shares its consistency term
        assert np.all(np.isnan(value[2:4]))
        assert np.all(np.isfinite(value[[0, 1, 4, 5]]))


# -------------------------------------------------- 3. empty batches


def _empty_cases():
    c = 5
    e = np.zeros((0, c), "float32")
    return {
        "kl": lambda: kd.kl_divergence(e, e, temperature=2.0),
        "kl_probabilities": lambda: kd.kl_divergence(e, e, from_logits=False),
        "symmetric_kl": lambda: kd.symmetric_kl_divergence(e, e),
        "jsd": lambda: kd.jensen_shannon_divergence(e, e),
        "cross_entropy": lambda: kd.cross_entropy(e, e),
        "entropy": lambda: kd.entropy(e),
        "gp": lambda: kd.global_pointer_kl_divergence(e, e),
        "mlce": lambda: kd.multilabel_categorical_crossentropy(e, e),
        "sparse_mlce": lambda: kd.sparse_multilabel_categorical_crossentropy(
            np.zeros((0, 3), "int32"), e
        ),
        "tckd": lambda: kd.target_class_kd(e, e, np.zeros(0, "int32")),
        "nckd": lambda: kd.non_target_class_kd(e, e, np.zeros(0, "int32")),
        "dkd": lambda: kd.decoupled_kd(e, e, np.zeros(0, "int32")),
        "paired": lambda: kd.paired_symmetric_kl_divergence(e),
    }


@pytest.mark.parametrize("name", sorted(_empty_cases()))
def test_empty_batch_gives_empty_values(name):
    # Regression: these raised on TensorFlow and torch ("Cannot compute the
    # max of an empty tensor") and returned [] on JAX.
    value = _empty_cases()[name]()
    assert tuple(value.shape) == (0,)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"


def test_empty_batch_log_probabilities_and_rank4():
    e = np.zeros((0, 5), "float32")
    assert tuple(kd.log_probabilities(e).shape) == (0, 5)
    e4 = np.zeros((0, 2, 3, 3), "float32")
    assert tuple(kd.global_pointer_kl_divergence(e4, e4).shape) == (0, 2)
    assert tuple(kd.multilabel_categorical_crossentropy(e4, e4).shape) == (0, 2)
    e3 = np.zeros((2, 0, 5), "float32")
    assert tuple(kd.kl_divergence(e3, e3).shape) == (2, 0)
