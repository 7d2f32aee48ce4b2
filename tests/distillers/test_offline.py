"""Offline distillation: cached teacher outputs (dense and top-k, in memory
and memory-mapped) give the online Distiller's loss without a teacher."""

import keras
import numpy as np
import pytest
from _cases import kl64, log_softmax64
from _cases_keras import np_
from _distiller_models import data, mlp, pair, sparse_ce

import keras_kd
from keras_kd import losses
from keras_kd.distillers.offline import dense_from_top_k
from keras_kd.distillers.teacher_cache import top_k_numpy


def _logs(distiller, x, y, **compile_kwargs):
    distiller.compile(keras.optimizers.SGD(0.0), **compile_kwargs)
    history = distiller.fit(x, y, batch_size=len(y), verbose=0).history
    return {k: v[0] for k, v in history.items()}


def _student_copy(student):
    copy = mlp(8, "student_copy")
    copy.set_weights(student.get_weights())
    return copy


def test_offline_loss_equals_online_loss():
    teacher, student = pair()
    x, y = data(16)
    settings = dict(
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=3.0),
        alpha=0.3,
    )
    online = _logs(keras_kd.Distiller(student, teacher), x, y, **settings)
    cache = keras_kd.cache_teacher_outputs(teacher, x, batch_size=5)
    np.testing.assert_allclose(
        cache["teacher_logits"], teacher.predict(x, verbose=0), rtol=1e-6
    )
    offline_distiller = keras_kd.OfflineDistiller(_student_copy(student))
    offline = _logs(offline_distiller, {"inputs": x, **cache}, y, **settings)
    assert set(offline) == set(online)
    for key in online:
        np.testing.assert_allclose(offline[key], online[key], rtol=1e-6)
    # a top-k cache with k = vocabulary size is exact too
    full = keras_kd.cache_teacher_outputs(teacher, x, top_k=4)
    exact = _logs(offline_distiller, {"inputs": x, **full}, y, **settings)
    for key in online:
        np.testing.assert_allclose(exact[key], online[key], rtol=1e-6)


def test_offline_training_follows_the_online_trajectory():
    teacher, student = pair()
    x, y = data(32)
    copy = _student_copy(student)
    start = student.get_weights()
    online = keras_kd.Distiller(student, teacher)
    offline = keras_kd.OfflineDistiller(copy)
    packed = {"inputs": x, **keras_kd.cache_teacher_outputs(teacher, x)}
    for distiller, inputs in ((online, x), (offline, packed)):
        distiller.compile(
            keras.optimizers.SGD(0.5),
            loss=sparse_ce(),
            distillation_loss=losses.KLDivergence(temperature=2.0),
            alpha=0.5,
        )
        distiller.fit(
            inputs, y, batch_size=8, epochs=2, shuffle=False, verbose=0
        )
    assert np.abs(student.get_weights()[0] - start[0]).max() > 1e-2
    for u, v in zip(student.get_weights(), copy.get_weights()):
        np.testing.assert_allclose(v, u, atol=1e-5)


def test_no_teacher_weights_and_plain_predict():
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.OfflineDistiller(student)
    assert distiller.teacher is None
    assert {id(v) for v in distiller.non_trainable_weights} == {
        id(distiller.alpha),
        id(distiller.temperature),
    }
    assert {id(v) for v in distiller.trainable_weights} == {
        id(v) for v in student.trainable_weights
    }
    cache = keras_kd.cache_teacher_outputs(teacher, x)
    distiller.compile("adam", loss=sparse_ce())
    distiller.fit({"inputs": x, **cache}, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(
        distiller.predict(x, verbose=0), student.predict(x, verbose=0)
    )
    with pytest.raises(ValueError, match="cached teacher outputs"):
        distiller.fit(x, y, verbose=0)


def renormalized_kl64(t, s, k, temperature):
    """KL from the teacher's top-k classes, renormalized, per row."""
    log_p = log_softmax64(t / temperature)
    log_q = log_softmax64(s / temperature)
    top = np.argsort(-t, axis=-1)[:, :k]
    log_p_k = np.take_along_axis(log_p, top, -1)
    log_q_k = np.take_along_axis(log_q, top, -1)
    log_m = np.log(np.exp(log_p_k).sum(-1))
    inside = np.sum(np.exp(log_p_k) * (log_p_k - log_q_k), axis=-1)
    return temperature**2 * (inside / np.exp(log_m) - log_m)


def test_top_k_keeps_and_renormalizes_the_top_classes(rng):
    t = rng.normal(size=(5, 12)).astype("float32") * 3
    s = rng.normal(size=(5, 12)).astype("float32") * 3
    loss = losses.KLDivergence(temperature=2.0, reduction="none")
    values, indices = top_k_numpy(t, 4)
    assert np.all(np.diff(values, axis=-1) <= 0)
    np.testing.assert_array_equal(np.sort(t, -1)[:, ::-1][:, :4], values)
    dense = np_(dense_from_top_k(values, indices, 12))
    assert np.sum(np.isfinite(dense)) == 5 * 4
    np.testing.assert_array_equal(
        np.take_along_axis(dense, indices, -1), values
    )
    np.testing.assert_allclose(
        np_(loss(dense, s)), renormalized_kl64(t, s, 4, 2.0), rtol=2e-5
    )


def test_top_k_error_vanishes_at_vocabulary_size(rng):
    classes = 16
    t = rng.normal(size=(8, classes)).astype("float32") * 2
    s = rng.normal(size=(8, classes)).astype("float32") * 2
    exact = kl64(t, s, 2.0).mean()
    loss = losses.KLDivergence(temperature=2.0)
    errors = []
    for k in (1, 8, 15, classes):
        values, indices = top_k_numpy(t, k)
        dense = dense_from_top_k(values, indices, classes)
        errors.append(abs(float(np_(loss(dense, s))) - exact))
    assert errors[0] > 0.05  # the truncation is a real error ...
    assert errors[-1] < 1e-6  # ... that is gone at k = vocabulary size
    assert errors[-2] < errors[0] / 10


def test_dense_from_top_k_on_sequences(rng):
    t = rng.normal(size=(2, 3, 10)).astype("float32")
    values, indices = top_k_numpy(t, 10)
    dense = np_(dense_from_top_k(values, indices, 10))
    np.testing.assert_allclose(dense, t)


def test_memory_mapped_cache(tmp_path):
    teacher, student = pair()
    x, y = data(20)
    path = tmp_path / "cache"
    written = keras_kd.cache_teacher_outputs(
        teacher, x, batch_size=6, top_k=2, path=str(path), dtype="float16"
    )
    in_memory = keras_kd.cache_teacher_outputs(teacher, x, top_k=2)
    loaded = keras_kd.load_teacher_outputs(str(path))
    assert set(loaded) == {"teacher_top_k_values", "teacher_top_k_indices"}
    for name, array in loaded.items():
        assert isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, written[name])
    np.testing.assert_array_equal(
        loaded["teacher_top_k_indices"], in_memory["teacher_top_k_indices"]
    )
    np.testing.assert_allclose(
        loaded["teacher_top_k_values"].astype("float32"),
        in_memory["teacher_top_k_values"],
        rtol=1e-3,
    )
    distiller = keras_kd.OfflineDistiller(student)
    distiller.compile("adam", loss=sparse_ce())
    history = distiller.fit(
        {"inputs": x, **loaded}, y, batch_size=10, epochs=2, verbose=0
    )
    assert np.all(np.isfinite(history.history["loss"]))


def test_save_and_reload(tmp_path):
    _, student = pair()
    distiller = keras_kd.OfflineDistiller(student)
    distiller.compile("adam", loss=sparse_ce())
    path = tmp_path / "offline.keras"
    distiller.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_kd.OfflineDistiller
    x, _ = data(4)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )


def test_invalid_arguments(tmp_path):
    teacher, _ = pair()
    x, _ = data(4)
    with pytest.raises(ValueError, match="top_k"):
        keras_kd.cache_teacher_outputs(teacher, x, top_k=0)
    with pytest.raises(ValueError, match="batch_size"):
        keras_kd.cache_teacher_outputs(teacher, x, batch_size=0)
    with pytest.raises(ValueError, match="one row per example"):
        keras_kd.cache_teacher_outputs(teacher, [1, 2, 3])
    with pytest.raises(ValueError, match="cache_teacher_outputs"):
        keras_kd.load_teacher_outputs(str(tmp_path))
    with pytest.raises(ValueError, match="student"):
        keras_kd.OfflineDistiller("student")
