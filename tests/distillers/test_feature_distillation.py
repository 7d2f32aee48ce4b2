"""FeatureDistiller: feature losses against NumPy, one student pass per
step, BatchNorm updated once, projections trained but not exported."""

import keras
import numpy as np
import pytest
from _cases import kl64
from _cases_keras import np_
from _distiller_models import data, sparse_ce, weights_of
from keras import layers

import keras_kd
from keras_kd import losses
from keras_kd import ops as kd


def mlp(hidden, name, batch_norm=False, dropout=0.0, extra=None):
    inputs = keras.Input((8,), name="x")
    h = layers.Dense(hidden, activation="relu", name=f"{name}_hidden")(inputs)
    if extra is not None:
        h = extra(h)
    if batch_norm:
        h = layers.BatchNormalization(name=f"{name}_bn")(h)
    if dropout:
        h = layers.Dropout(dropout, name=f"{name}_dropout")(h)
    outputs = layers.Dense(4, name=f"{name}_out")(h)
    return keras.Model(inputs, outputs, name=name)


def convnet(channels, name):
    inputs = keras.Input((6, 6, 1))
    h = layers.Conv2D(channels, 3, padding="same", name=f"{name}_conv")(inputs)
    h = layers.Activation("relu")(h)
    outputs = layers.Dense(3)(layers.GlobalAveragePooling2D()(h))
    return keras.Model(inputs, outputs, name=name)


def intermediate(model, name, x):
    view = keras.Model(model.inputs, model.get_layer(name).output)
    return view.predict(x, verbose=0).astype("float64")


# ------------------------------------------------------- losses and ops


def unit64(v, axis=-1):
    norm = np.sqrt(np.sum(v**2, axis=axis, keepdims=True))
    return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)


def attention64(f, p=2):
    energy = np.mean(np.abs(f) ** p, axis=-1).reshape(len(f), -1)
    return unit64(energy)


def test_feature_losses_match_numpy(rng):
    t = rng.normal(size=(3, 4, 4, 5)).astype("float32")
    s = rng.normal(size=(3, 4, 4, 5)).astype("float32")
    t[0, 1, 1] = 0.0  # a zero vector has cosine 0
    t64, s64 = t.astype("f8"), s.astype("f8")
    mse = np.mean((s64 - t64) ** 2, axis=(1, 2, 3))
    cosine = np.mean(1 - np.sum(unit64(t64) * unit64(s64), -1), axis=(1, 2))
    at = np.sum((attention64(s64) - attention64(t64)) ** 2, axis=-1)
    np.testing.assert_allclose(
        np_(kd.feature_mean_squared_error(t, s)), mse, rtol=1e-5
    )
    np.testing.assert_allclose(
        np_(kd.feature_cosine_distance(t, s)), cosine, rtol=1e-5
    )
    np.testing.assert_allclose(
        np_(kd.attention_transfer(t, s)), at, rtol=1e-4, atol=1e-7
    )
    # teacher and student may differ in channels for attention transfer
    wide = np.concatenate([t, t], axis=-1)
    np.testing.assert_allclose(
        np_(kd.attention_transfer(wide, s)), at, rtol=1e-4, atol=1e-7
    )


def test_scale_free_losses_survive_huge_activations(rng):
    t = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    s = rng.normal(size=(2, 3, 3, 4)).astype("float32")
    for fn in (kd.attention_transfer, kd.feature_cosine_distance):
        small = np_(fn(t, s))
        huge = np_(fn(t * 1e25, s * 1e-25))
        np.testing.assert_allclose(huge, small, rtol=1e-5)
    zero = np_(kd.attention_transfer(np.zeros_like(t), s))
    np.testing.assert_allclose(zero, 1.0, rtol=1e-6)


def test_feature_losses_serialize_and_validate():
    for loss in (
        losses.FeatureMeanSquaredError(),
        losses.FeatureCosineDistance(axis=-1),
        losses.AttentionTransfer(p=1),
    ):
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(restored) is type(loss)
        assert restored.get_config() == loss.get_config()
    with pytest.raises(ValueError, match="Invalid value for argument `p`"):
        losses.AttentionTransfer(p=0)
    with pytest.raises(ValueError, match="same positions"):
        kd.attention_transfer(np.ones((1, 4, 4, 2)), np.ones((1, 2, 2, 2)))


# ------------------------------------------------------------ distiller


def test_logged_terms_match_reference_with_projection():
    teacher, student = mlp(16, "teacher"), mlp(8, "student")
    x, y = data(16)
    distiller = keras_kd.FeatureDistiller(
        student,
        teacher,
        features=[("student_hidden", "teacher_hidden")],
        feature_weight=0.5,
    )
    distiller.compile(
        keras.optimizers.SGD(0.0),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.2,
    )
    logs = distiller.fit(x, y, batch_size=16, verbose=0).history
    (projection,) = distiller.projections
    kernel, bias = (w.astype("f8") for w in projection.get_weights())
    assert kernel.shape == (8, 16)
    hint = intermediate(student, "student_hidden", x) @ kernel + bias
    target = intermediate(teacher, "teacher_hidden", x)
    feature = 0.5 * np.mean((hint - target) ** 2)
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    distill = kl64(t, s, 2.0).mean() + feature
    np.testing.assert_allclose(logs["feature_loss"][0], feature, rtol=1e-5)
    np.testing.assert_allclose(logs["distillation_loss"][0], distill, rtol=1e-5)
    assert set(logs) == {
        "loss",
        "student_loss",
        "distillation_loss",
        "feature_loss",
    }


def test_attention_transfer_on_conv_features():
    teacher, student = convnet(6, "teacher"), convnet(3, "student")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 6, 6, 1)).astype("float32")
    y = rng.integers(0, 3, size=8)
    distiller = keras_kd.FeatureDistiller(
        student,
        teacher,
        features={"student_conv": "teacher_conv"},
        feature_loss="attention",
        logits_weight=0.0,
    )
    assert distiller.projections == [None]  # attention maps are width-free
    distiller.compile(keras.optimizers.SGD(0.0), alpha=0.0)
    logs = distiller.fit(x, y, batch_size=8, verbose=0).history
    at = np.sum(
        (
            attention64(intermediate(student, "student_conv", x))
            - attention64(intermediate(teacher, "teacher_conv", x))
        )
        ** 2,
        axis=-1,
    ).mean()
    np.testing.assert_allclose(logs["feature_loss"][0], at, rtol=1e-4)
    np.testing.assert_allclose(logs["distillation_loss"][0], at, rtol=1e-4)


class CountCalls(layers.Layer):
    calls = 0

    def call(self, x):
        CountCalls.calls += 1
        return x


@pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="eager JAX runs op by op (slow); the BatchNorm test below shows "
    "one training pass per step on every backend",
)
def test_student_runs_once_per_step():
    CountCalls.calls = 0
    counter = CountCalls()
    teacher = mlp(16, "teacher")
    student = mlp(8, "student", dropout=0.5, extra=counter)
    distiller = keras_kd.FeatureDistiller(
        student, teacher, features=[("student_dropout", "teacher_hidden")]
    )
    distiller.compile("sgd", loss=sparse_ce(), run_eagerly=True)
    x, y = data(8)
    distiller.train_on_batch(x, y)  # the first step also builds symbolically
    CountCalls.calls = 0
    distiller.train_on_batch(x, y)
    distiller.train_on_batch(x, y)
    assert CountCalls.calls == 2


def test_batch_norm_statistics_updated_once_per_step():
    teacher = mlp(16, "teacher", batch_norm=True)
    student = mlp(16, "student", batch_norm=True)
    plain = mlp(16, "plain", batch_norm=True)
    plain.set_weights(student.get_weights())
    x, y = data(16)
    x = x * 3.0 + 1.0  # batch statistics far from the initial (0, 1)
    plain.compile("sgd", loss=sparse_ce())
    plain.train_on_batch(x, y)
    distiller = keras_kd.FeatureDistiller(
        student, teacher, features=[("student_bn", "teacher_bn")]
    )
    distiller.compile("sgd", loss=sparse_ce())
    distiller.train_on_batch(x, y)
    mean = np_(student.get_layer("student_bn").moving_mean)
    expected = np_(plain.get_layer("plain_bn").moving_mean)
    np.testing.assert_allclose(mean, expected, rtol=1e-6, atol=1e-7)
    assert np.abs(expected).max() > 1e-3  # one update moved the statistics


def test_projection_trained_teacher_frozen_student_exported():
    teacher, student = mlp(16, "teacher"), mlp(8, "student")
    x, y = data(32)
    distiller = keras_kd.FeatureDistiller(
        student,
        teacher,
        features=[("student_hidden", "teacher_hidden")],
        feature_loss="cosine",
        projection="conv",
    )
    (projection,) = distiller.projections
    # a 1x1 convolution needs positions: on [batch, width] it is a Dense
    assert isinstance(projection, layers.Dense)
    trainable = {id(v) for v in distiller.trainable_weights}
    expected = student.trainable_weights + projection.trainable_weights
    assert trainable == {id(v) for v in expected}
    teacher_before = weights_of(teacher)
    projection_before = weights_of(projection)
    distiller.compile("adam", loss=sparse_ce())
    distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
    for u, v in zip(teacher_before, weights_of(teacher)):
        np.testing.assert_array_equal(u, v)
    assert any(
        np.abs(u - v).max() > 0
        for u, v in zip(projection_before, weights_of(projection))
    )
    assert distiller.student is student
    assert len(student.weights) == 4  # no projection inside the student


def test_save_and_reload(tmp_path):
    teacher, student = mlp(16, "teacher"), mlp(8, "student")
    distiller = keras_kd.FeatureDistiller(
        student,
        teacher,
        features=[("student_hidden", "teacher_hidden")],
        feature_loss=["cosine"],
        feature_weight=[2.0],
    )
    x, y = data(16)
    distiller.compile("adam", loss=sparse_ce())
    distiller.fit(x, y, batch_size=8, verbose=0)
    path = tmp_path / "feature.keras"
    distiller.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_kd.FeatureDistiller
    assert loaded.feature_weights == [2.0]
    assert isinstance(loaded.feature_losses[0], losses.FeatureCosineDistance)
    for u, v in zip(
        weights_of(distiller.projections[0]), weights_of(loaded.projections[0])
    ):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )


def test_invalid_arguments():
    teacher, student = mlp(16, "teacher"), mlp(8, "student")
    pair = [("student_hidden", "teacher_hidden")]
    with pytest.raises(ValueError, match="names of student layers"):
        keras_kd.FeatureDistiller(student, teacher, [("nope", "teacher_out")])
    with pytest.raises(ValueError, match="pairs"):
        keras_kd.FeatureDistiller(student, teacher, ["student_hidden"])
    with pytest.raises(ValueError, match="feature_loss"):
        keras_kd.FeatureDistiller(student, teacher, pair, feature_loss="l1")
    with pytest.raises(ValueError, match="feature_weight"):
        keras_kd.FeatureDistiller(student, teacher, pair, feature_weight=[1, 2])
    with pytest.raises(ValueError, match="projection"):
        keras_kd.FeatureDistiller(student, teacher, pair, projection="linear")

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = layers.Dense(4)

        def call(self, x):
            return self.dense(x)

    subclassed = Subclassed()
    subclassed(np.zeros((1, 8), "float32"))
    with pytest.raises(ValueError, match="Functional or Sequential"):
        keras_kd.FeatureDistiller(subclassed, teacher, [("dense", "x")])
