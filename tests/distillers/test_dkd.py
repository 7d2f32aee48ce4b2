"""Decoupled KD (ops, loss, DKDDistiller) against float64 NumPy, and the
reverse KL / generalized JSD as distillation losses of a Distiller."""

import keras
import numpy as np
import pytest
from _cases import kl64, log_softmax64
from _cases_keras import np_
from _distiller_models import data, pair, sparse_ce
from scipy.special import logsumexp

import keras_kd
from keras_kd import losses
from keras_kd import ops as kd

# ------------------------------------------------------ float64 reference


def _binary64(logits, labels, temperature):
    log_p = log_softmax64(np.asarray(logits, "f8") / temperature)
    rows = np.arange(len(labels))
    log_target = log_p[rows, labels]
    others = log_p.copy()
    others[rows, labels] = -np.inf
    return np.stack([log_target, logsumexp(others, axis=-1)], axis=-1)


def _kl_rows64(log_p, log_q):
    p = np.exp(log_p)
    ratio = np.where(p > 0, log_p - np.where(p > 0, log_q, 0.0), 0.0)
    return np.sum(p * ratio, axis=-1)


def dkd64(t, s, labels, alpha, beta, temperature):
    """TCKD, NCKD and DKD per row in float64 log space."""
    tckd = _kl_rows64(
        _binary64(t, labels, temperature), _binary64(s, labels, temperature)
    )
    rows = np.arange(len(labels))

    def non_target(z):
        z = np.array(z, "f8") / temperature
        z[rows, labels] = -np.inf
        top = z.max(axis=-1, keepdims=True)
        return z - top - logsumexp(z - top, axis=-1, keepdims=True)

    nckd = _kl_rows64(non_target(t), non_target(s))
    t2 = temperature**2
    return t2 * tckd, t2 * nckd, t2 * (alpha * tckd + beta * nckd)


def _logits(scale, seed, rows=6, classes=5):
    rng = np.random.default_rng(seed)
    t = (rng.normal(size=(rows, classes)) * scale).astype("float32")
    s = (rng.normal(size=(rows, classes)) * scale).astype("float32")
    labels = rng.integers(0, classes, size=rows)
    return t, s, labels


# --------------------------------------------------------------------- ops


@pytest.mark.parametrize("scale", [1.0, 30.0, 1e3])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_dkd_matches_float64_reference(scale, temperature):
    t, s, labels = _logits(scale, seed=int(scale))
    # A confident teacher: the target alone holds all float32 mass.
    t[0] = -scale
    t[0, labels[0]] = scale
    tckd, nckd, dkd = dkd64(t, s, labels, 1.0, 8.0, temperature)
    got_t = np_(kd.target_class_kd(t, s, labels, temperature))
    got_n = np_(kd.non_target_class_kd(t, s, labels, temperature))
    got = np_(kd.decoupled_kd(t, s, labels, 1.0, 8.0, temperature))
    for value, ref in [(got_t, tckd), (got_n, nckd), (got, dkd)]:
        assert np.all(np.isfinite(value))
        np.testing.assert_allclose(value, ref, rtol=2e-5, atol=1e-6)


def test_classic_kd_is_tckd_plus_weighted_nckd():
    # KL = TCKD + (1 - p_target_teacher) * NCKD (Zhao et al., eq. 1-5).
    t, s, labels = _logits(3.0, seed=1)
    kl = kl64(t, s, 2.0)
    tckd = np_(kd.target_class_kd(t, s, labels, 2.0))
    nckd = np_(kd.non_target_class_kd(t, s, labels, 2.0))
    p_target = np.exp(log_softmax64(t / 2.0))[np.arange(len(labels)), labels]
    np.testing.assert_allclose(tckd + (1 - p_target) * nckd, kl, atol=1e-5)


def _student_gradient(loss_fn, s):
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(jax.grad(loss_fn))(s)
    if backend == "tensorflow":
        import tensorflow as tf

        s = tf.constant(s)
        with tf.GradientTape() as tape:
            tape.watch(s)
            value = loss_fn(s)
        return tape.gradient(value, s)
    import torch

    s = torch.tensor(s, requires_grad=True)
    loss_fn(s).backward()
    return s.grad


def test_gradient_finite_for_confident_logits():
    t, s, labels = _logits(1e4, seed=2)
    s[0] = 0.0
    s[0, (labels[0] + 1) % 5] = 1e4  # confidently wrong student
    loss = losses.DecoupledKD(temperature=1.0)
    grad = np_(_student_gradient(lambda v: loss((t, labels), v), s))
    assert np.all(np.isfinite(grad))
    # the wrong class is pushed down, the target up, with a full-size step
    assert grad[0, (labels[0] + 1) % 5] > 0.1
    assert grad[0, labels[0]] < -0.1


def test_one_hot_labels_equal_indices():
    t, s, labels = _logits(2.0, seed=3)
    one_hot = np.eye(5, dtype="float32")[labels]
    loss = losses.DecoupledKD(beta=2.0, temperature=2.0)
    np.testing.assert_allclose(
        np_(loss((t, one_hot), s)),
        np_(loss((t, labels), s)),
        rtol=1e-6,
    )


def test_invalid_arguments():
    with pytest.raises(ValueError, match="beta"):
        losses.DecoupledKD(beta=-1.0)
    with pytest.raises(ValueError, match="warmup_steps"):
        losses.DecoupledKD(warmup_steps=2.5)
    with pytest.raises(ValueError, match="temperature"):
        losses.DecoupledKD(temperature=0.0)
    t, s, labels = _logits(1.0, seed=4)
    with pytest.raises(ValueError, match="teacher_logits, labels"):
        losses.DecoupledKD()(t, s)
    with pytest.raises(ValueError, match="loss.step"):
        losses.DecoupledKD(warmup_steps=3)((t, labels), s)


def test_serialize_round_trip_and_step():
    loss = losses.DecoupledKD(alpha=0.5, beta=4.0, warmup_steps=4)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is losses.DecoupledKD
    assert restored.get_config() == loss.get_config()
    t, s, labels = _logits(1.0, seed=5)
    restored.step = 1
    full = losses.DecoupledKD(alpha=0.5, beta=4.0)((t, labels), s)
    np.testing.assert_allclose(
        np_(restored((t, labels), s)), np_(full) / 4, rtol=1e-6
    )


# -------------------------------------------------------------- distiller


def test_dkd_distiller_logs_reference_and_warms_up():
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.DKDDistiller(student, teacher)
    distiller.compile(
        keras.optimizers.SGD(0.0),
        loss=sparse_ce(),
        distillation_loss=losses.DecoupledKD(warmup_steps=2),
        alpha=0.25,
    )
    history = distiller.fit(x, y, batch_size=16, epochs=3, verbose=0)
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    ref = dkd64(t, s, y, 1.0, 8.0, 4.0)[2].mean()
    logged = history.history["distillation_loss"]
    np.testing.assert_allclose(logged, [ref / 2, ref, ref], rtol=1e-5)
    assert int(np_(distiller.step)) == 3
    distiller.evaluate(x, y, verbose=0)
    assert int(np_(distiller.step)) == 3


def test_plain_distiller_rejects_dkd():
    teacher, student = pair()
    x, y = data(8)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", distillation_loss=losses.DecoupledKD())
    with pytest.raises(ValueError, match="DKDDistiller"):
        distiller.fit(x, y, verbose=0)


# -------------------------------- other divergences as distillation losses


@pytest.mark.parametrize(
    "loss",
    [
        losses.ReverseKLDivergence(temperature=2.0),
        losses.JensenShannonDivergence(beta=0.3, temperature=2.0),
    ],
    ids=["reverse_kl", "jsd"],
)
def test_divergences_as_distillation_loss(loss):
    # Temperature convention: logits divided by T, the divergence times T**2.
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        keras.optimizers.SGD(0.0), distillation_loss=loss, alpha=0.0
    )
    logged = distiller.fit(x, y, batch_size=16, verbose=0).history
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    log_p, log_q = log_softmax64(t / 2.0), log_softmax64(s / 2.0)
    if isinstance(loss, losses.ReverseKLDivergence):
        rows = _kl_rows64(log_q, log_p)
    else:
        log_m = np.logaddexp(np.log(0.3) + log_p, np.log(0.7) + log_q)
        rows = 0.3 * _kl_rows64(log_p, log_m) + 0.7 * _kl_rows64(log_q, log_m)
    np.testing.assert_allclose(
        logged["distillation_loss"][0], 4.0 * rows.mean(), rtol=1e-5
    )


def test_saved_distiller_resumes_the_warmup_count(tmp_path):
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.DKDDistiller(student, teacher)
    distiller.compile(
        "adam",
        loss=sparse_ce(),
        distillation_loss=losses.DecoupledKD(warmup_steps=10),
    )
    distiller.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "dkd.keras"
    distiller.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_kd.DKDDistiller
    assert int(np_(loaded.step)) == 2
    assert loaded.distillation_loss.step is loaded.step
    loaded.fit(x, y, batch_size=8, verbose=0)
    assert int(np_(loaded.step)) == 4
