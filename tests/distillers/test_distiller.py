"""The Distiller's training contract: losses, frozen teacher, inputs."""

import keras
import numpy as np
import pytest
from _cases import kl64, sparse_ce64
from _distiller_models import (
    CLASSES,
    FEATURES,
    assert_weights_equal,
    data,
    mlp,
    pair,
    sparse_ce,
    weights_of,
)
from keras import layers

import keras_kd
from keras_kd import losses


def frozen_optimizer():
    # Learning rate 0: the weights stay put, so every logged value can be
    # compared with a reference computed from the initial models.
    return keras.optimizers.SGD(learning_rate=0.0)


def test_history_keys_and_metrics_on_student():
    teacher, student = pair()
    x, y = data(32)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        "adam",
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        metrics=["sparse_categorical_accuracy"],
    )
    history = distiller.fit(
        x, y, validation_data=(x, y), epochs=2, batch_size=8, verbose=0
    )
    names = {"loss", "student_loss", "distillation_loss"}
    names.add("sparse_categorical_accuracy")
    assert set(history.history) == names | {"val_" + n for n in names}
    logs = distiller.evaluate(x, y, verbose=0, return_dict=True)
    predicted = np.argmax(distiller.student.predict(x, verbose=0), -1)
    np.testing.assert_allclose(
        logs["sparse_categorical_accuracy"], np.mean(predicted == y)
    )
    np.testing.assert_array_equal(
        distiller.predict(x, verbose=0), student.predict(x, verbose=0)
    )


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_logged_terms_match_reference(alpha):
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        frozen_optimizer(),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=3.0),
        alpha=alpha,
    )
    history = distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    distill = kl64(t, s, 3.0).mean()
    hard = sparse_ce64(y, s).mean()
    logs = {k: v[0] for k, v in history.history.items()}
    np.testing.assert_allclose(logs["distillation_loss"], distill, atol=1e-5)
    np.testing.assert_allclose(logs["student_loss"], hard, atol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], alpha * hard + (1 - alpha) * distill, atol=1e-5
    )


def test_pure_distillation_needs_no_labels():
    teacher, student = pair()
    x, _ = data(32)
    before = teacher.predict(x, verbose=0)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(keras.optimizers.Adam(0.05), alpha=0.5)
    gap = kl64(before, student.predict(x, verbose=0)).mean()
    history = distiller.fit(x, epochs=5, batch_size=8, verbose=0)
    assert set(history.history) == {"loss", "distillation_loss"}
    np.testing.assert_allclose(
        history.history["loss"], history.history["distillation_loss"]
    )
    after = kl64(before, student.predict(x, verbose=0)).mean()
    assert after < 0.5 * gap


def test_recompile_without_loss_drops_student_term():
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce())
    distiller.fit(x, y, verbose=0)
    distiller.compile("sgd")
    logs = distiller.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == {"loss", "distillation_loss"}


def test_teacher_frozen_and_untouched():
    teacher, student = pair(batch_norm=True, dropout=0.5)
    x, y = data(32)
    before = weights_of(teacher)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("adam", loss=sparse_ce(), alpha=0.5)
    distiller.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert_weights_equal(weights_of(teacher), before)
    assert teacher.trainable
    student_ids = {id(v) for v in student.trainable_weights}
    assert {id(v) for v in distiller.trainable_weights} == student_ids
    assert all(
        id(v) in {id(w) for w in distiller.non_trainable_weights}
        for v in teacher.weights
    )
    # The student's own BatchNormalization statistics did move.
    assert not np.allclose(student.layers[2].moving_mean, 0.0)


class CallCounter(layers.Layer):
    """Identity layer that counts its (eager) calls by training mode."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = {True: 0, False: 0}

    def call(self, inputs, training=None):
        self.calls[bool(training)] += 1
        return inputs


def counted_mlp(hidden, name):
    counter = CallCounter()
    inputs = keras.Input((FEATURES,))
    h = layers.Dense(hidden, activation="relu")(counter(inputs))
    return keras.Model(inputs, layers.Dense(CLASSES)(h), name=name), counter


def test_student_and_teacher_run_once_per_step():
    teacher, teacher_count = counted_mlp(16, "teacher")
    student, student_count = counted_mlp(8, "student")
    x, y = data(8)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce(), run_eagerly=True)
    # The first fit also traces shapes symbolically; count a second one.
    distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    teacher_count.calls = {True: 0, False: 0}
    student_count.calls = {True: 0, False: 0}
    distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert student_count.calls == {True: 2, False: 0}
    assert teacher_count.calls == {True: 0, False: 2}


def test_batch_norm_statistics_updated_once_per_step():
    teacher, _ = pair()
    inputs = keras.Input((FEATURES,))
    normalized = layers.BatchNormalization(momentum=0.5)(inputs)
    student = keras.Model(inputs, layers.Dense(CLASSES)(normalized))
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce())
    distiller.fit(x, y, batch_size=16, epochs=1, verbose=0)
    np.testing.assert_allclose(
        student.layers[1].moving_mean, 0.5 * x.mean(0), atol=1e-6
    )


def test_sample_weight_weights_both_terms():
    teacher, student = pair()
    x, y = data(16)
    w = np.tile([0.0, 1.0, 3.0, 0.5], 4).astype("float32")
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(frozen_optimizer(), loss=sparse_ce(), alpha=0.25)
    logs = distiller.evaluate(
        x, y, sample_weight=w, batch_size=16, verbose=0, return_dict=True
    )
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    distill = np.sum(w * kl64(t, s)) / len(x)
    hard = np.sum(w * sparse_ce64(y, s)) / len(x)
    np.testing.assert_allclose(logs["distillation_loss"], distill, atol=1e-5)
    np.testing.assert_allclose(logs["student_loss"], hard, atol=1e-5)
    np.testing.assert_allclose(
        logs["loss"], 0.25 * hard + 0.75 * distill, atol=1e-5
    )


VOCAB, LENGTH = 6, 5


def token_model(name, mask_zero):
    inputs = keras.Input((LENGTH,), dtype="int32")
    h = layers.Embedding(VOCAB, 8, mask_zero=mask_zero)(inputs)
    outputs = layers.Dense(VOCAB)(h)
    return keras.Model(inputs, outputs, name=name)


def tokens(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(8, LENGTH)).astype("int32")
    lengths = np.array([5, 3, 1, 4, 2, 5, 3, 2])
    padding = np.arange(LENGTH)[None, :] < lengths[:, None]
    return np.where(padding, ids, 0).astype("int32"), padding


def test_keras_mask_of_student_output_applies():
    ids, padding = tokens()
    teacher = token_model("teacher", mask_zero=False)
    student = token_model("student", mask_zero=True)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(frozen_optimizer(), loss=sparse_ce(), alpha=0.5)
    logs = distiller.evaluate(
        ids, ids, batch_size=8, verbose=0, return_dict=True
    )
    t, s = teacher.predict(ids, verbose=0), student.predict(ids, verbose=0)
    distill = kl64(t, s)[padding].mean()
    hard = sparse_ce64(ids, s)[padding].mean()
    np.testing.assert_allclose(logs["distillation_loss"], distill, atol=1e-5)
    np.testing.assert_allclose(logs["student_loss"], hard, atol=1e-5)


def text_model(name, width):
    token_ids = keras.Input((LENGTH,), dtype="int32", name="token_ids")
    padding_mask = keras.Input((LENGTH,), dtype="int32", name="padding_mask")
    h = layers.Embedding(VOCAB, width)(token_ids)
    keep = layers.Reshape((LENGTH, 1))(padding_mask)
    h = h * keras.ops.cast(keep, h.dtype)
    outputs = layers.Dense(VOCAB)(h)
    return keras.Model(
        {"token_ids": token_ids, "padding_mask": padding_mask},
        outputs,
        name=name,
    )


def test_dict_inputs_and_sequence_outputs_with_padding_mask():
    ids, padding = tokens()
    x = {"token_ids": ids, "padding_mask": padding.astype("int32")}
    teacher, student = text_model("teacher", 12), text_model("student", 4)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        frozen_optimizer(),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.5,
    )
    weights = padding.astype("float32")
    history = distiller.fit(
        x, ids, sample_weight=weights, batch_size=8, verbose=0
    )
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    assert s.shape == (8, LENGTH, VOCAB)
    distill = np.sum(weights * kl64(t, s, 2.0)) / weights.size
    np.testing.assert_allclose(
        history.history["distillation_loss"][0], distill, atol=1e-5
    )
    distiller.compile("adam", loss=sparse_ce())
    first = distiller.fit(x, ids, sample_weight=weights, verbose=0)
    last = distiller.fit(x, ids, sample_weight=weights, epochs=5, verbose=0)
    assert last.history["loss"][-1] < first.history["loss"][0]


def two_heads(hidden, name):
    inputs = keras.Input((FEATURES,))
    h = layers.Dense(hidden, activation="relu")(inputs)
    outputs = {"a": layers.Dense(CLASSES)(h), "b": layers.Dense(3)(h)}
    return keras.Model(inputs, outputs, name=name)


def test_dict_outputs_sum_the_distillation_terms():
    teacher, student = two_heads(16, "teacher"), two_heads(8, "student")
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        frozen_optimizer(),
        loss={"a": sparse_ce(), "b": sparse_ce()},
        distillation_loss=losses.KLDivergence(temperature=2.0),
    )
    logs = distiller.evaluate(
        x, {"a": y, "b": y % 3}, batch_size=16, verbose=0, return_dict=True
    )
    t, s = teacher.predict(x, verbose=0), student.predict(x, verbose=0)
    distill = sum(kl64(t[k], s[k], 2.0).mean() for k in "ab")
    np.testing.assert_allclose(logs["distillation_loss"], distill, atol=1e-5)


def test_student_regularization_counts_and_teacher_regularization_not():
    teacher = mlp(
        16,
        "teacher",
        kernel_regularizer=keras.regularizers.L2(1.0),
        activity_regularizer=keras.regularizers.L1(1.0),
    )
    student = mlp(8, "student", kernel_regularizer=keras.regularizers.L2(0.1))
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(frozen_optimizer(), loss=sparse_ce(), alpha=0.5)
    logs = distiller.fit(x, y, batch_size=16, verbose=0).history
    penalty = sum(
        0.1 * np.sum(np.square(layer.kernel))
        for layer in student.layers
        if hasattr(layer, "kernel")
    )
    np.testing.assert_allclose(
        logs["loss"][0],
        0.5 * logs["student_loss"][0]
        + 0.5 * logs["distillation_loss"][0]
        + penalty,
        rtol=1e-5,
    )


def test_unbuilt_student_is_built_by_fit():
    teacher, _ = pair()
    student = keras.Sequential([layers.Dense(8), layers.Dense(CLASSES)])
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce())
    distiller.fit(x, y, verbose=0)
    assert student.built
    assert len(distiller.trainable_weights) == 4


@pytest.mark.parametrize("alpha", [-0.1, 1.5, float("nan"), True, "0.1"])
def test_invalid_alpha(alpha):
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    with pytest.raises(ValueError, match="Invalid value for argument `alpha`"):
        distiller.compile("sgd", alpha=alpha)


@pytest.mark.parametrize(
    "loss", ["kl_divergence", keras.losses.kl_divergence, 2.0]
)
def test_distillation_loss_must_be_a_loss(loss):
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    with pytest.raises(ValueError, match="`distillation_loss`"):
        distiller.compile("sgd", distillation_loss=loss)


def test_output_shape_mismatch_names_both_shapes():
    teacher = mlp(16, "teacher")
    inputs = keras.Input((FEATURES,))
    student = keras.Model(inputs, layers.Dense(CLASSES + 1)(inputs))
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd")
    x, y = data(8)
    # Checked where the pairs are formed, so that a subclass may distill
    # only some outputs of a student with more heads than its teacher.
    with pytest.raises(ValueError, match=r"5\).*4\)"):
        distiller.fit(x, y, verbose=0)


def test_output_shape_mismatch_of_lazy_student_caught_in_fit():
    teacher, _ = pair()
    student = keras.Sequential([layers.Dense(CLASSES + 2)])
    x, y = data(8)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd")
    with pytest.raises(ValueError, match=r"6\).*4\)"):
        distiller.fit(x, y, verbose=0)


def test_invalid_models():
    teacher, student = pair()
    with pytest.raises(ValueError, match="`teacher`"):
        keras_kd.Distiller(student, lambda x: x)
    with pytest.raises(ValueError, match="`teacher`"):
        keras_kd.Distiller(student, student)
    unbuilt = keras.Sequential([layers.Dense(CLASSES)])
    with pytest.raises(ValueError, match="built"):
        keras_kd.Distiller(student, unbuilt)
    distiller = keras_kd.Distiller(student, teacher)
    x, y = data(8)
    with pytest.raises(ValueError, match="compile"):
        distiller.compute_loss(x, y, distiller(x))
