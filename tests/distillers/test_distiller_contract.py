"""The Distiller family under hostile input: frozen teachers, per-model
inputs, sample weights with masks and without labels, checked arguments."""

import keras
import numpy as np
import pytest
from _cases import kl64
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

# ------------------------------------------------------- the frozen teacher


def test_shared_variable_is_rejected_with_its_path():
    shared = layers.Dense(16, name="shared_encoder")
    inputs = keras.Input((FEATURES,))
    teacher = keras.Model(inputs, layers.Dense(CLASSES)(shared(inputs)))
    inputs = keras.Input((FEATURES,))
    student = keras.Model(inputs, layers.Dense(CLASSES)(shared(inputs)))
    with pytest.raises(ValueError, match="shared_encoder/kernel"):
        keras_kd.Distiller(student, teacher)
    with pytest.raises(ValueError, match="teachers\\[0\\].*shared_encoder"):
        keras_kd.MultiTeacherDistiller(student, [teacher])


def _bn_teacher():
    return mlp(16, "teacher", batch_norm=True, dropout=0.3)


def _distillers():
    def plain():
        teacher, student = _bn_teacher(), mlp(8, "student")
        return keras_kd.Distiller(student, teacher), [teacher]

    def multi():
        teachers = [_bn_teacher(), mlp(12, "other", batch_norm=True)]
        return (
            keras_kd.MultiTeacherDistiller(mlp(8, "student"), teachers),
            teachers,
        )

    def feature():
        teacher, student = _bn_teacher(), mlp(8, "student")
        hidden = [
            (s.name, t.name)
            for s, t in zip(student.layers[1:2], teacher.layers[1:2])
        ]
        return keras_kd.FeatureDistiller(student, teacher, hidden), [teacher]

    def dkd():
        teacher, student = _bn_teacher(), mlp(8, "student")
        return keras_kd.DKDDistiller(student, teacher), [teacher]

    return {"plain": plain, "multi": multi, "feature": feature, "dkd": dkd}


@pytest.mark.parametrize("kind", sorted(_distillers()))
def test_teachers_bit_identical_through_fit_evaluate_predict_save(
    kind, tmp_path
):
    distiller, teachers = _distillers()[kind]()
    before = [weights_of(t) for t in teachers]
    flags = [[layer.trainable for layer in t.layers] for t in teachers]
    x, y = data(32)
    x = x * 3.0 + 1.0  # batch statistics far from the moving ones
    distiller.compile("adam", loss=sparse_ce(), alpha=0.5)
    distiller.fit(x, y, batch_size=8, epochs=2, verbose=0)
    distiller.evaluate(x, y, verbose=0)
    distiller.predict(x, verbose=0)
    path = tmp_path / "d.keras"
    distiller.save(path)
    keras.models.load_model(path)
    for teacher, weights, flag in zip(teachers, before, flags):
        assert_weights_equal(weights, weights_of(teacher))
        assert [layer.trainable for layer in teacher.layers] == flag
        assert teacher.trainable


class Subclassed(keras.Model):
    def __init__(self, width, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(width, activation="relu")
        self.head = layers.Dense(CLASSES)

    def call(self, x):
        return self.head(self.hidden(x))


def test_built_subclassed_teacher_and_student():
    x, y = data(16)
    teacher, student = Subclassed(16), Subclassed(8)
    teacher(x[:1])
    before = weights_of(teacher)
    for distiller in (
        keras_kd.Distiller(student, teacher),
        keras_kd.MultiTeacherDistiller(student, [teacher]),
    ):
        distiller.compile("adam", loss=sparse_ce())
        logs = distiller.fit(x, y, batch_size=8, verbose=0).history
        assert np.isfinite(logs["loss"]).all()
    assert_weights_equal(before, weights_of(teacher))


# --------------------------------------------------------------- arguments


def test_numpy_scalars_accepted_and_bad_numbers_rejected():
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", alpha=np.float32(0.5))
    assert float(keras.ops.convert_to_numpy(distiller.alpha)) == 0.5
    distiller.compile("sgd", alpha=np.array(0.25))
    for alpha in (float("nan"), 1.5, True, "0.5"):
        with pytest.raises(ValueError, match="Received: alpha="):
            distiller.compile("sgd", alpha=alpha)
    with pytest.raises(ValueError, match="`temperature`"):
        distiller.compile(
            "sgd",
            distillation_loss=losses.KLDivergence(temperature=np.array(0.0)),
        )
    pairs = [(student.layers[1].name, teacher.layers[1].name)]
    for bad in (float("inf"), -1.0, float("nan")):
        with pytest.raises(ValueError, match="feature_weight"):
            keras_kd.FeatureDistiller(
                student, teacher, pairs, feature_weight=bad
            )


def test_corrupt_cache_names_the_file(tmp_path):
    teacher, _ = pair()
    x, _ = data(16)
    keras_kd.cache_teacher_outputs(teacher, x, path=str(tmp_path))
    file = tmp_path / "teacher_logits.npy"
    raw = file.read_bytes()
    file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="teacher_logits.npy"):
        keras_kd.load_teacher_outputs(str(tmp_path))
    file.write_bytes(b"not a numpy file at all")
    with pytest.raises(ValueError, match="teacher_logits.npy"):
        keras_kd.load_teacher_outputs(str(tmp_path))
    np.save(file, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="teacher_logits.npy"):
        keras_kd.load_teacher_outputs(str(tmp_path))
    with pytest.raises(ValueError, match="`top_k`"):
        keras_kd.cache_teacher_outputs(teacher, x, top_k=0)


# ------------------------------------------------ weights, masks and labels


def _sequence_model(name, width, vocab=12, length=5):
    inputs = keras.Input((length,), dtype="int32", name="token_ids")
    h = layers.Embedding(vocab, width, mask_zero=True)(inputs)
    h = layers.Dense(width, activation="tanh")(h)
    return keras.Model(inputs, layers.Dense(vocab)(h), name=name)


def _sequence_data(n=8, vocab=12, length=5):
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, vocab, size=(n, length)).astype("int32")
    for i in range(n):
        tokens[i, length - 1 - i % 3 :] = 0  # padding
    labels = rng.integers(0, vocab, size=(n, length)).astype("int32")
    weights = rng.uniform(0.5, 2.0, size=(n, length)).astype("float32")
    return tokens, labels, weights


def test_masked_outputs_with_sample_weight_give_each_loss_its_own_weights():
    teacher = _sequence_model("teacher", 16)
    student = _sequence_model("student", 8)
    tokens, labels, weights = _sequence_data()
    alone = keras.models.clone_model(student)
    alone.set_weights(student.get_weights())
    alone.compile("sgd", loss=sparse_ce())
    expected = alone.evaluate(
        tokens, labels, sample_weight=weights, batch_size=8, verbose=0
    )
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce(), alpha=0.5)
    logs = distiller.evaluate(
        tokens,
        labels,
        sample_weight=weights,
        batch_size=8,
        return_dict=True,
        verbose=0,
    )
    np.testing.assert_allclose(logs["student_loss"], expected, rtol=1e-5)
    # The distillation term: mean over real tokens of w * KL.
    kl = kl64(
        teacher.predict(tokens, verbose=0), student.predict(tokens, verbose=0)
    )
    real = tokens > 0
    reference = (kl * weights * real).sum() / real.sum()
    # Small KL values (1e-3) carry float32 cancellation of ~1e-4.
    np.testing.assert_allclose(logs["distillation_loss"], reference, rtol=3e-4)
    history = distiller.fit(
        tokens, labels, sample_weight=weights, batch_size=4, verbose=0
    ).history
    assert np.isfinite(history["loss"]).all()


def test_sample_weight_without_labels_weights_the_distillation():
    teacher, student = pair()
    x, _ = data(16)
    w = np.linspace(0.0, 2.0, 16).astype("float32")
    kl = kl64(teacher.predict(x, verbose=0), student.predict(x, verbose=0))
    expected = float((w * kl).sum() / len(x))
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(keras.optimizers.SGD(0.0))
    logs = distiller.fit(
        x,
        sample_weight=w,
        batch_size=16,
        verbose=0,
        validation_data=(x, None, w),
    ).history
    np.testing.assert_allclose(
        logs["distillation_loss"][0], expected, rtol=1e-5
    )
    np.testing.assert_allclose(logs["loss"][0], expected, rtol=1e-5)
    np.testing.assert_allclose(
        logs["val_distillation_loss"][0], expected, rtol=1e-5
    )
    value = distiller.evaluate(x, sample_weight=w, batch_size=16, verbose=0)
    np.testing.assert_allclose(value, expected, rtol=1e-5)
    unweighted = distiller.evaluate(x, batch_size=16, verbose=0)
    np.testing.assert_allclose(unweighted, kl.mean(), rtol=1e-5)


class FirstHeadDistiller(keras_kd.Distiller):
    """Distills the first head of a two-head student only."""

    def compute_distillation_loss(self, x, y, y_pred, teacher_pred, sw=None):
        return super().compute_distillation_loss(
            x, y, y_pred[0], teacher_pred, sw
        )


def test_single_output_teacher_for_a_two_output_student():
    teacher, _ = pair()
    inputs = keras.Input((FEATURES,), name="x")
    h = layers.Dense(8, activation="relu")(inputs)
    student = keras.Model(
        inputs, [layers.Dense(CLASSES)(h), layers.Dense(1)(h)]
    )
    x, _ = data(16)
    distiller = FirstHeadDistiller(student, teacher)
    distiller.compile(keras.optimizers.SGD(0.0))
    logs = distiller.fit(x, batch_size=16, verbose=0).history
    head = student.predict(x, verbose=0)[0]
    expected = kl64(teacher.predict(x, verbose=0), head).mean()
    np.testing.assert_allclose(
        logs["distillation_loss"][0], expected, rtol=1e-5
    )


def test_each_model_receives_its_own_inputs_by_name():
    def model(name, keys):
        inputs = {k: keras.Input((3,), name=k) for k in keys}
        merged = layers.Concatenate()(list(inputs.values()))
        return keras.Model(inputs, layers.Dense(CLASSES)(merged), name=name)

    teacher = model("teacher", ["token_ids", "segment_ids"])
    student = model("student", ["token_ids"])
    rng = np.random.default_rng(0)
    x = {
        "segment_ids": rng.normal(size=(8, 3)).astype("float32"),
        "token_ids": rng.normal(size=(8, 3)).astype("float32"),
    }
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(keras.optimizers.SGD(0.0))
    logs = distiller.fit(x, batch_size=8, verbose=0).history
    student_out = student.predict({"token_ids": x["token_ids"]}, verbose=0)
    np.testing.assert_allclose(
        distiller.predict(x, verbose=0), student_out, rtol=1e-6
    )
    expected = kl64(teacher.predict(x, verbose=0), student_out).mean()
    np.testing.assert_allclose(
        logs["distillation_loss"][0], expected, rtol=1e-5
    )


# ------------------------------------------------------- feature distiller


def _nested(name):
    inputs = keras.Input((FEATURES,), name="x")
    inner_in = keras.Input((FEATURES,))
    hidden = layers.Dense(6, activation="relu", name="inner_layer")(inner_in)
    backbone = keras.Model(
        inner_in,
        {"sequence_output": hidden, "pooled": layers.Dense(3)(hidden)},
        name="backbone",
    )
    parts = backbone(inputs)
    outputs = layers.Dense(CLASSES)(parts["sequence_output"])
    return keras.Model(inputs, outputs, name=name)


def test_feature_paths_into_dict_outputs_and_clear_errors():
    teacher, student = _nested("teacher"), _nested("student")
    distiller = keras_kd.FeatureDistiller(
        student, teacher, [("backbone/sequence_output", "backbone/pooled")]
    )
    x, y = data(8)
    distiller.compile(keras.optimizers.SGD(0.0), loss=sparse_ce())
    logs = distiller.fit(x, y, batch_size=8, verbose=0).history
    assert np.isfinite(logs["feature_loss"]).all()
    with pytest.raises(ValueError, match="sequence_output"):
        keras_kd.FeatureDistiller(student, teacher, [("backbone", "backbone")])
    with pytest.raises(ValueError, match="inner_layer.*backbone"):
        keras_kd.FeatureDistiller(
            student, teacher, [("inner_layer", "backbone/pooled")]
        )


# ------------------------------------------------------------ NaN is seen


def _linear(name):
    # No ReLU: XLA's max(NaN, 0) is 0, which would hide the NaN row inside
    # the models before it reaches the loss.
    inputs = keras.Input((FEATURES,))
    return keras.Model(inputs, layers.Dense(CLASSES)(inputs), name=name)


def test_nan_input_row_shows_in_the_loss_and_stops_training():
    teacher, student = _linear("teacher"), _linear("student")
    x, _ = data(16)
    x[3, 0] = np.nan
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd")
    logs = distiller.fit(
        x,
        batch_size=8,
        epochs=3,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    assert len(logs["loss"]) == 1  # stopped after the first epoch
    assert np.isnan(logs["loss"][0])
    assert np.isnan(logs["distillation_loss"][0])


def test_nan_cached_logit_shows_in_the_offline_loss():
    teacher, student = pair()
    x, y = data(16)
    cache = keras_kd.cache_teacher_outputs(teacher, x)
    cache["teacher_logits"][5, 2] = np.nan
    offline = keras_kd.OfflineDistiller(student)
    offline.compile("sgd")
    logs = offline.fit(
        {"inputs": x, **cache},
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    ).history
    assert len(logs["loss"]) == 1 and np.isnan(logs["loss"][0])
