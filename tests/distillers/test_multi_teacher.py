"""MultiTeacherDistiller: the mixture of teachers and the weighted mean of
per-teacher losses against NumPy; all teachers frozen."""

import keras
import numpy as np
import pytest
from _cases import kl64, log_softmax64
from _distiller_models import data, mlp, sparse_ce, weights_of
from scipy.special import logsumexp

import keras_kd
from keras_kd import losses


def models():
    return (
        [mlp(16, "teacher_a"), mlp(12, "teacher_b"), mlp(10, "teacher_c")],
        mlp(8, "student"),
    )


def mixture_kl64(teacher_logits, student_logits, weights, temperature):
    kept = [(w, t) for w, t in zip(weights, teacher_logits) if w > 0]
    weights = np.array([w for w, _ in kept]) / np.sum(weights)
    log_ps = np.stack([log_softmax64(t / temperature) for _, t in kept])
    log_mix = logsumexp(log_ps + np.log(weights)[:, None, None], axis=0)
    log_q = log_softmax64(student_logits / temperature)
    kl = np.sum(np.exp(log_mix) * (log_mix - log_q), axis=-1)
    return temperature**2 * kl


@pytest.mark.parametrize("combine", ["probabilities", "losses"])
def test_logged_loss_matches_reference(combine):
    teachers, student = models()
    x, y = data(16)
    weights = [3.0, 1.0, 0.0]
    distiller = keras_kd.MultiTeacherDistiller(
        student, teachers, weights=weights, combine=combine
    )
    distiller.compile(
        keras.optimizers.SGD(0.0),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.5,
    )
    logged = distiller.fit(x, y, batch_size=16, verbose=0).history
    ts = [t.predict(x, verbose=0) for t in teachers]
    s = student.predict(x, verbose=0)
    if combine == "probabilities":
        ref = mixture_kl64(ts, s, weights, 2.0).mean()
    else:
        ref = sum(w / 4.0 * kl64(t, s, 2.0).mean() for w, t in zip(weights, ts))
    np.testing.assert_allclose(
        logged["distillation_loss"][0], ref, rtol=1e-5, atol=1e-7
    )


def test_both_combinations_give_the_same_kl_step():
    # KL(P || Q) is linear in P up to a term without Q, so the mixture and
    # the weighted mean of losses have the same gradient.
    teachers, _ = models()
    x, y = data(16)
    results = []
    for combine in ("probabilities", "losses"):
        keras.utils.set_random_seed(7)
        student = mlp(8, "student")
        start = weights_of(student)
        distiller = keras_kd.MultiTeacherDistiller(
            student, teachers[:2], weights=[1.0, 2.0], combine=combine
        )
        distiller.compile(
            keras.optimizers.SGD(1.0),
            distillation_loss=losses.KLDivergence(temperature=3.0),
        )
        distiller.fit(x, y, batch_size=16, epochs=2, verbose=0)
        results.append(weights_of(student))
    moved = max(np.abs(u - v).max() for u, v in zip(results[0], start))
    assert moved > 1e-3
    for u, v in zip(*results):
        np.testing.assert_allclose(u, v, atol=2e-6)


def test_teachers_frozen_and_untrained():
    teachers, student = models()
    x, y = data(16)
    distiller = keras_kd.MultiTeacherDistiller(student, teachers)
    assert {id(v) for v in distiller.trainable_weights} == {
        id(v) for v in student.trainable_weights
    }
    before = [weights_of(t) for t in teachers]
    distiller.compile("adam", loss=sparse_ce())
    distiller.fit(x, y, batch_size=8, verbose=0)
    for teacher, old in zip(teachers, before):
        for u, v in zip(old, weights_of(teacher)):
            np.testing.assert_array_equal(u, v)
    assert distiller.teachers == teachers
    assert all(t.trainable for t in teachers)  # the caller's flags untouched


def test_save_and_reload(tmp_path):
    teachers, student = models()
    distiller = keras_kd.MultiTeacherDistiller(
        student, teachers[:2], weights=[1, 3], combine="losses"
    )
    distiller.compile("adam", loss=sparse_ce())
    path = tmp_path / "multi.keras"
    distiller.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_kd.MultiTeacherDistiller
    assert loaded.teacher_weights == [0.25, 0.75]
    assert loaded.combine == "losses"
    x, _ = data(4)
    for ours, theirs in zip(teachers[:2], loaded.teachers):
        np.testing.assert_allclose(
            theirs.predict(x, verbose=0), ours.predict(x, verbose=0)
        )


def test_invalid_arguments():
    teachers, student = models()
    with pytest.raises(ValueError, match="teachers"):
        keras_kd.MultiTeacherDistiller(student, [])
    with pytest.raises(ValueError, match="distinct"):
        keras_kd.MultiTeacherDistiller(student, [teachers[0], teachers[0]])
    with pytest.raises(ValueError, match="weights"):
        keras_kd.MultiTeacherDistiller(student, teachers, weights=[1, 2])
    with pytest.raises(ValueError, match="weights"):
        keras_kd.MultiTeacherDistiller(student, teachers, weights=[0, 0, 0])
    with pytest.raises(ValueError, match="combine"):
        keras_kd.MultiTeacherDistiller(student, teachers, combine="mean")
    with pytest.raises(ValueError, match="teachers\\[1\\]"):
        keras_kd.MultiTeacherDistiller(student, [teachers[0], student])
    wrong = keras.Sequential([keras.Input((8,)), keras.layers.Dense(5)])
    distiller = keras_kd.MultiTeacherDistiller(student, [teachers[0], wrong])
    distiller.compile("sgd")
    x = np.zeros((4, 8), "float32")
    with pytest.raises(ValueError, match="same structure and shape"):
        distiller.fit(x, np.zeros((4,), "int32"), verbose=0)
    with pytest.raises(ValueError, match="weights"):
        keras_kd.MultiTeacherDistiller(
            student, teachers, weights=[1.0, float("inf"), 1.0]
        )
    # Weights near the float maximum normalize without overflowing.
    huge = keras_kd.MultiTeacherDistiller(
        student, teachers[:2], weights=[1e308, np.float64(1e308)]
    )
    assert huge.teacher_weights == [0.5, 0.5]
