"""The numeric contract at the edges of the loss classes and labels: empty
batches, out-of-range labels and NumPy arguments."""

import keras
import numpy as np
import pytest
from _cases import (
    dkd64,
    f32,
    jsd64,
    kl64,
    log_softmax64,
    logit_pairs,
    mlce64,
)
from _cases_keras import (
    close,
    engine_path,  # noqa: F401 (each test runs on both paths)
    np_,
)

from keras_kd import losses
from keras_kd import ops as kd
from keras_kd.losses.rdrop import validate_alpha
from keras_kd.ops._core import validate_beta, validate_temperature

pytestmark = pytest.mark.usefixtures("engine_path")

CASES = logit_pairs()
INVALID = r"Invalid value for argument `{}`. Expected .* Received: {}="


# ------------------------------------------ 3. empty batches, Loss classes


def _empty_losses():
    e, e4 = np.zeros((0, 5), "float32"), np.zeros((0, 2, 3, 3), "float32")
    labels = np.zeros((0,), "int32")
    return [
        (losses.KLDivergence, e, e),
        (losses.ReverseKLDivergence, e, e),
        (losses.SymmetricKLDivergence, e, e),
        (losses.JensenShannonDivergence, e, e),
        (losses.GlobalPointerKLDivergence, e4, e4),
        (losses.MultilabelCategoricalCrossentropy, e, e),
        (losses.SparseMultilabelCategoricalCrossentropy, labels[:, None], e),
        (losses.RDropCategoricalCrossentropy, e, e),
        (losses.RDropSparseCategoricalCrossentropy, labels, e),
        (losses.DecoupledKD, (e, labels), e),
        (losses.FeatureMeanSquaredError, e, e),
        (losses.FeatureCosineDistance, e, e),
        (losses.AttentionTransfer, e4, e4),
    ]


@pytest.mark.parametrize("case", range(len(_empty_losses())))
def test_empty_batch_losses(case):
    # Regression: KL, symmetric KL, JSD, multi-label CE and DKD raised on
    # TensorFlow and torch and gave [] on JAX. A reduced loss is the
    # scalar 0; unreduced, the empty per-example values.
    cls, y_true, y_pred = _empty_losses()[case]
    for reduction in ("sum_over_batch_size", "sum", "mean"):
        value = cls(reduction=reduction)(y_true, y_pred)
        assert tuple(value.shape) == () and float(np_(value)) == 0.0, cls
    value = cls(reduction="none")(y_true, y_pred)
    assert np_(value).size == 0 and np_(value).shape[0] == 0


# -------------------------------------------- 5. out-of-range labels


def test_dkd_out_of_range_labels_give_nan():
    # Regression: label == classes was finite on TensorFlow and JAX and an
    # error on torch.
    t, s = (x[:4, :5] for x in CASES["random"])
    good = np.array([0, 2, 4, 1])
    rows = [0, 3]
    expected = dkd64(t[rows], s[rows], good[rows], 0.5, 4.0, 2.0)
    for labels in (
        np.array([0, 5, -1, 1]),
        np.array([0.0, 5.0, np.nan, 1.0], "float32"),
        np.array([[0], [7], [-3], [1]]),
    ):
        values = [
            kd.target_class_kd(t, s, labels, 2.0),
            kd.non_target_class_kd(t, s, labels, 2.0),
            kd.decoupled_kd(t, s, labels, 0.5, 4.0, 2.0),
        ]
        for value, reference in zip(values, expected):
            value = np_(value)
            assert np.all(np.isnan(value[[1, 2]]))
            close(value[rows], reference)
    loss = losses.DecoupledKD(0.5, 4.0, 2.0, reduction="none")
    value = np_(loss((t, np.array([0, 5, -1, 1])), s))
    assert np.all(np.isnan(value[[1, 2]])) and np.all(np.isfinite(value[rows]))


def test_rdrop_sparse_out_of_range_labels_give_nan():
    # Regression: label -1 silently used the last class.
    rng = np.random.default_rng(7)
    logits = f32(rng.normal(size=(6, 3)))
    loss = losses.RDropSparseCategoricalCrossentropy(
        2.0, from_logits=True, reduction="none"
    )
    reference = np_(loss(np.array([0, 0, 2, 2, 1, 1]), logits))
    value = np_(loss(np.array([0, -1, 2, 3, 1, 1]), logits))
    assert np.all(np.isnan(value[[1, 3]]))
    close(value[[0, 2, 4, 5]], reference[[0, 2, 4, 5]])
    value = np_(loss(np.array([0, 0, np.nan, 2, 1, 1], "float32"), logits))
    assert np.isnan(value[2]) and np.isfinite(value[3])
    dense = losses.RDropCategoricalCrossentropy(
        2.0, from_logits=True, reduction="none"
    )
    one_hot = np.eye(3, dtype="float32")[[0, 0, 2, 2, 1, 1]]
    one_hot[4, 1] = np.nan
    value = np_(dense(one_hot, logits))
    assert np.isnan(value[4]) and np.all(np.isfinite(value[[0, 1, 2, 3, 5]]))


def test_sparse_multilabel_out_of_range_indices_give_nan():
    # Regression: a positive index equal to the class count was silently
    # dropped. Padding (-1, or 0 with mask_zero) stays padding.
    logits = f32(np.random.default_rng(8).normal(size=(5, 6)))
    indices = np.array(
        [[1, 6, -1], [0, 2, -1], [7, -1, -1], [-2, 1, -1], [5, -1, -1]]
    )
    dense = np.zeros((5, 6), "float32")
    dense[1, [0, 2]] = 1.0
    dense[4, 5] = 1.0
    bad = [0, 2, 3]
    value = np_(kd.sparse_multilabel_categorical_crossentropy(indices, logits))
    assert np.all(np.isnan(value[bad]))
    close(value[[1, 4]], mlce64(dense, logits)[[1, 4]])
    value = np_(
        kd.sparse_multilabel_categorical_crossentropy(
            np.array([[0, 1, -1], [6, 0, 0], [1, 0, 0], [0, 0, 0], [2, 0, 0]]),
            logits,
            mask_zero=True,
        )
    )
    assert np.isnan(value[1]) and np.all(np.isfinite(value[[0, 2, 3, 4]]))
    # through the Loss, labels arrive as floats: 2.5 is not an index
    loss = losses.SparseMultilabelCategoricalCrossentropy(reduction="none")
    value = np_(loss(np.array([[2.5, -1.0]] * 5, "float32"), logits))
    assert np.all(np.isnan(value))
    value = np_(loss(indices, logits))
    assert np.all(np.isnan(value[bad])) and np.all(np.isfinite(value[[1, 4]]))


# ---------------------------------------------- 6. NumPy and checked args


def test_decoupled_kd_accepts_numpy_scalars():
    # Regression: DecoupledKD(beta=np.float32(8)) was rejected.
    t, s = (x[:4, :5] for x in CASES["random"])
    labels = np.array([0, 2, 4, 1])
    loss = losses.DecoupledKD(
        alpha=np.float64(0.5),
        beta=np.float32(8),
        temperature=np.float32(2.0),
        warmup_steps=np.int64(0),
    )
    assert loss.beta == 8.0 and type(loss.beta) is float
    assert loss.warmup_steps == 0 and type(loss.warmup_steps) is int
    plain = losses.DecoupledKD(alpha=0.5, beta=8.0, temperature=2.0)
    close(loss((t, labels), s), np_(plain((t, labels), s)))
    restored = losses.DecoupledKD.from_config(loss.get_config())
    assert restored.get_config() == loss.get_config()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": True}, "warmup_steps"),
        ({"warmup_steps": np.float32(3)}, "warmup_steps"),
        ({"beta": np.float32(np.nan)}, "beta"),
        ({"alpha": True}, "alpha"),
        ({"alpha": np.array([1.0])}, "alpha"),
        ({"temperature": np.array(0.0)}, "temperature"),
    ],
)
def test_decoupled_kd_rejects(kwargs, name):
    with pytest.raises(ValueError, match=INVALID.format(name, name)):
        losses.DecoupledKD(**kwargs)


def test_temperature_checks_numpy_and_passes_tensors():
    # Regression: KLDivergence(temperature=np.array(0.)) was accepted and
    # gave NaN.
    t, s = CASES["random"]
    for bad in (np.array(0.0), np.float64(-1.0), np.array([2.0]), "2"):
        with pytest.raises(
            ValueError, match=INVALID.format(*["temperature"] * 2)
        ):
            losses.KLDivergence(temperature=bad)
        with pytest.raises(ValueError, match="`temperature`"):
            kd.kl_divergence(t, s, temperature=bad)
    with pytest.raises(ValueError, match="`temperature`"):
        losses.KLDivergence(temperature=keras.Variable(0.0))
    expected = kl64(t, s, 2.0)
    for good in (np.array(2.0), np.float32(2.0), np.int64(2)):
        close(kd.kl_divergence(t, s, temperature=good), expected)
        close(losses.KLDivergence(temperature=good)(t, s), expected.mean())
    # a tensor (a tracer under jit) is only known at run time
    tensor = keras.ops.convert_to_tensor(2.0)
    close(kd.kl_divergence(t, s, temperature=tensor), expected)
    close(kd.log_probabilities(s, temperature=tensor), log_softmax64(s, 2.0))


def test_other_numpy_arguments_and_wrappers():
    t, s = CASES["random"]
    jsd = losses.JensenShannonDivergence(beta=np.float32(0.25))
    assert jsd.beta == 0.25
    close(jsd(t, s), jsd64(t, s, 0.25).mean())
    with pytest.raises(ValueError, match=INVALID.format("beta", "beta")):
        losses.JensenShannonDivergence(beta=np.array(1.5))
    assert validate_beta(np.float32(0.5)) == 0.5
    assert validate_temperature(np.float32(3.0)) == 3.0
    variable = keras.Variable(2.0)
    assert validate_temperature(variable) is variable
    assert validate_alpha(np.float32(2.0)) == 2.0
    with pytest.raises(ValueError, match=INVALID.format("alpha", "alpha")):
        validate_alpha(-1.0)
    rdrop = losses.RDropSparseCategoricalCrossentropy(alpha=np.float32(2))
    assert rdrop.alpha == 2.0
    assert losses.AttentionTransfer(p=np.float32(2)).p == 2.0
    with pytest.raises(ValueError, match=INVALID.format("alpha", "alpha")):
        kd.decoupled_kd(t[:, :5], s[:, :5], np.zeros(5, "int32"), alpha=-1.0)
