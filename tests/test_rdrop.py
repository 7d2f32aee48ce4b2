"""Tests of `keras_kd.RDrop`: one pass per step, the loss, masks, config."""

import keras
import numpy as np
import pytest
from _cases import sparse_ce64, symmetric_kl64
from _cases_keras import np_
from keras import layers

import keras_kd
from keras_kd.rdrop import _infer_divergence


class CallCounter(layers.Layer):
    """Identity that records, in variables, how often and on how many rows
    it ran: variables count executions inside compiled train steps too."""

    def build(self, input_shape):
        self.calls = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="calls"
        )
        self.rows = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="rows"
        )

    def call(self, x):
        self.calls.assign_add(1.0)
        self.rows.assign(keras.ops.cast(keras.ops.shape(x)[0], "float32"))
        return x


class RowsSeen(keras.metrics.Metric):
    """Counts the rows of `y_pred` that the compiled metrics receive."""

    def __init__(self, name="rows_seen", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(
            shape=(), initializer="zeros", name="total"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        rows = keras.ops.cast(keras.ops.shape(y_pred)[0], "float32")
        self.total.assign_add(rows)

    def result(self):
        return keras.ops.convert_to_tensor(self.total)


def classifier(dropout=0.3, counter=None):
    inputs = keras.Input((6,))
    x = inputs if counter is None else counter(inputs)
    x = layers.Dense(16, activation="tanh")(x)
    x = layers.Dropout(dropout)(x)
    return keras.Model(inputs, layers.Dense(4)(x))


def data(rows=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 6)).astype("float32")
    return x, rng.integers(0, 4, size=rows)


def test_one_forward_pass_per_step():
    counter = CallCounter()
    rdrop = keras_kd.RDrop(classifier(counter=counter), alpha=1.0)
    rdrop.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[RowsSeen()],
    )
    x, y = data(rows=24)
    history = rdrop.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert float(np_(counter.calls)) == 3.0
    assert float(np_(counter.rows)) == 16.0
    # Compiled metrics see every example once, not twice.
    assert history.history["rows_seen"][-1] == 24.0
    assert set(history.history) == {"loss", "rdrop_divergence", "rows_seen"}

    logs = rdrop.evaluate(x, y, batch_size=24, verbose=0, return_dict=True)
    assert float(np_(counter.calls)) == 4.0
    assert float(np_(counter.rows)) == 24.0
    assert "rdrop_divergence" not in logs
    assert rdrop.predict(x[:5], verbose=0).shape == (5, 4)
    assert float(np_(counter.rows)) == 5.0


def test_no_dropout_means_zero_divergence_and_the_plain_loss():
    model = classifier(dropout=0.0)
    rdrop = keras_kd.RDrop(model, alpha=8.0)
    rdrop.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    weights = np.linspace(0.5, 2.0, len(y)).astype("float32")
    logs = rdrop.train_on_batch(x, y, sample_weight=weights, return_dict=True)
    assert logs["rdrop_divergence"] == 0.0
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
        y, model(x, training=True), sample_weight=weights
    )
    np.testing.assert_allclose(logs["loss"], np_(plain), rtol=1e-6)


def test_loss_is_cross_entropy_plus_alpha_over_four_divergence():
    alpha = 3.0
    rdrop = keras_kd.RDrop(classifier(dropout=0.5), alpha=alpha)
    rdrop.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data(rows=6)
    weights = np.array([1.0, 0.0, 2.0, 1.0, 0.5, 1.0], "float32")
    y_pred = rdrop(x, training=True)
    assert tuple(y_pred.shape) == (12, 4)
    loss = rdrop.compute_loss(x, y, y_pred, weights, training=True)

    p = np_(y_pred)
    ce = sparse_ce64(np.repeat(y, 2), p) * np.repeat(weights, 2)
    divergence = symmetric_kl64(p[0::2], p[1::2])
    assert divergence.min() > 1e-4  # dropout made the copies differ
    expected = ce.mean() + alpha / 4 * (divergence * weights).mean()
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)


def token_model():
    tokens = keras.Input((None,), dtype="int32")
    x = layers.Embedding(12, 8, mask_zero=True)(tokens)
    x = layers.Dropout(0.5)(x)
    return keras.Model(tokens, layers.Dense(5)(x))


TOKENS = np.array([[3, 4, 5, 0, 0], [6, 7, 8, 9, 2], [1, 0, 0, 0, 0]])
TAGS = np.array([[1, 2, 3, 0, 0], [4, 0, 1, 2, 3], [2, 0, 0, 0, 0]])


def test_token_level_padding_contributes_nothing():
    alpha = 2.0
    rdrop = keras_kd.RDrop(token_model(), alpha=alpha)
    rdrop.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    y_pred = rdrop(TOKENS, training=True)
    loss = rdrop.compute_loss(TOKENS, TAGS, y_pred, training=True)

    p = np_(y_pred)
    real = TOKENS > 0
    ce = sparse_ce64(np.repeat(TAGS, 2, axis=0), p)[np.repeat(real, 2, axis=0)]
    divergence = symmetric_kl64(p[0::2], p[1::2])[real]
    expected = ce.mean() + alpha / 4 * divergence.mean()
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)
    assert float(np_(rdrop.divergence_tracker.result())) == (
        pytest.approx(divergence.mean(), rel=1e-5)
    )


def test_token_level_sample_weight_masks_the_divergence():
    # Without a Keras mask, a [batch, length] sample weight of 0 removes
    # padded tokens from both terms (Keras divides by the token count).
    inner = token_model()
    rdrop = keras_kd.RDrop(inner, alpha=4.0)
    rdrop.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    weights = (TOKENS > 0).astype("float32")
    y_pred = rdrop(TOKENS, training=True)
    y_pred = keras.ops.add(y_pred, 0.0)  # a fresh tensor: no Keras mask
    loss = rdrop.compute_loss(TOKENS, TAGS, y_pred, weights, training=True)
    p = np_(y_pred)
    ce = sparse_ce64(np.repeat(TAGS, 2, axis=0), p) * np.repeat(weights, 2, 0)
    divergence = symmetric_kl64(p[0::2], p[1::2]) * weights
    expected = ce.mean() + divergence.mean()
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)


def test_dict_inputs_and_two_outputs_each_get_their_divergence():
    alpha = 2.0
    a, b = keras.Input((3,), name="a"), keras.Input((2,), name="b")
    h = layers.Dropout(0.5)(layers.Concatenate()([a, b]))
    logits = layers.Dense(4)(h)
    probabilities = layers.Dense(3, activation="softmax")(h)
    model = keras.Model({"a": a, "b": b}, [logits, probabilities])
    rdrop = keras_kd.RDrop(model, alpha=alpha)
    rdrop.compile(
        optimizer="sgd",
        loss=[
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            "sparse_categorical_crossentropy",  # probabilities
        ],
    )
    rng = np.random.default_rng(3)
    x = {
        "a": rng.normal(size=(5, 3)).astype("float32"),
        "b": rng.normal(size=(5, 2)).astype("float32"),
    }
    y = [rng.integers(0, 4, size=5), rng.integers(0, 3, size=5)]
    first, second = rdrop(x, training=True)
    loss = rdrop.compute_loss(x, y, [first, second], training=True)

    p, q = np_(first), np_(second).astype("float64")
    log_q = np.log(q)  # probabilities: their logs are the logits
    expected = (
        sparse_ce64(np.repeat(y[0], 2), p).mean()
        + sparse_ce64(np.repeat(y[1], 2), log_q).mean()
        + alpha
        / 4
        * (
            symmetric_kl64(p[0::2], p[1::2]).mean()
            + symmetric_kl64(log_q[0::2], log_q[1::2]).mean()
        )
    )
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)


def test_divergence_only_mode_for_unlabeled_data():
    alpha = 6.0
    rdrop = keras_kd.RDrop(
        classifier(dropout=0.4),
        alpha=alpha,
        divergence=keras_kd.losses.SymmetricKLDivergence(),
    )
    rdrop.compile(optimizer=keras.optimizers.SGD(0.1))
    x, _ = data(rows=8)
    history = rdrop.fit(x, batch_size=8, epochs=2, verbose=0).history
    assert history["rdrop_divergence"][0] > 0.0
    np.testing.assert_allclose(
        history["loss"],
        alpha / 4 * np.array(history["rdrop_divergence"]),
        rtol=1e-6,
    )
    logs = rdrop.evaluate(x, batch_size=8, verbose=0, return_dict=True)
    assert logs["loss"] == 0.0  # one pass: nothing to compare
    # With no compiled loss the divergence cannot be inferred.
    guessing = keras_kd.RDrop(classifier(), alpha=1.0)
    guessing.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="divergence"):
        guessing.fit(x, batch_size=8, epochs=1, verbose=0)


def test_divergence_is_inferred_from_the_compiled_loss():
    divergence = _infer_divergence("sparse_categorical_crossentropy")
    assert isinstance(divergence, keras_kd.losses.SymmetricKLDivergence)
    assert divergence.from_logits is False
    divergence = _infer_divergence(
        keras.losses.CategoricalCrossentropy(from_logits=True)
    )
    assert divergence.from_logits is True
    multilabel = _infer_divergence(
        keras_kd.losses.MultilabelCategoricalCrossentropy()
    )
    assert isinstance(multilabel, keras_kd.losses.GlobalPointerKLDivergence)
    binary = _infer_divergence(keras.losses.BinaryCrossentropy(True))
    assert isinstance(binary, keras_kd.losses.GlobalPointerKLDivergence)
    for loss in ("mse", keras.losses.BinaryCrossentropy()):
        with pytest.raises(ValueError, match="cannot be inferred"):
            _infer_divergence(loss)


def test_global_pointer_with_rdrop_uses_the_sigmoid_divergence():
    alpha = 2.0
    tokens = keras.Input((None,), dtype="int32")
    x = layers.Embedding(10, 8, mask_zero=True)(tokens)
    x = layers.Dropout(0.5)(x)
    logits = keras_kd.layers.GlobalPointer(heads=2, head_size=4)(x)
    rdrop = keras_kd.RDrop(keras.Model(tokens, logits), alpha=alpha)
    rdrop.compile(
        optimizer="adam",
        loss=keras_kd.losses.MultilabelCategoricalCrossentropy(),
        metrics=[keras_kd.metrics.SpanF1()],
    )
    ids = np.array([[1, 2, 3, 0], [4, 5, 0, 0]])
    labels = np.zeros((2, 2, 4, 4), "float32")
    labels[0, 0, 0, 1] = labels[1, 1, 1, 1] = 1.0
    y_pred = rdrop(ids, training=True)
    loss = rdrop.compute_loss(ids, labels, y_pred, training=True)

    p = np_(y_pred).astype("float64")
    live = np.isfinite(p)
    assert not live[0::2].any() or (live[0::2] == live[1::2]).all()
    safe = np.where(live, p, 0.0)
    positive = np.repeat(labels, 2, axis=0) > 0
    neg = np.where(live & ~positive, np.exp(safe), 0.0).sum(axis=(2, 3))
    pos = np.where(live & positive, np.exp(-safe), 0.0).sum(axis=(2, 3))
    mlce = np.log1p(neg) + np.log1p(pos)
    s, t = safe[0::2], safe[1::2]
    sig = (1 / (1 + np.exp(-s)) - 1 / (1 + np.exp(-t))) * (s - t)
    divergence = np.where(live[0::2], sig, 0.0).sum(axis=(2, 3))
    expected = mlce.mean() + alpha / 4 * divergence.mean()
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)

    history = rdrop.fit(ids, labels, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    assert "span_f1" in history


def test_saved_and_reloaded(tmp_path):
    rdrop = keras_kd.RDrop(
        classifier(),
        alpha=2.5,
        divergence=keras_kd.losses.SymmetricKLDivergence(temperature=2.0),
        name="rdrop",
    )
    rdrop.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = data()
    rdrop.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "rdrop.keras")
    rdrop.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_kd.RDrop)
    assert loaded.alpha == 2.5
    assert loaded.divergence.temperature == 2.0
    assert isinstance(loaded.loss, keras.losses.SparseCategoricalCrossentropy)
    np.testing.assert_allclose(
        np_(loaded.predict(x, verbose=0)),
        np_(rdrop.predict(x, verbose=0)),
        atol=1e-6,
    )
    history = loaded.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_invalid_arguments():
    with pytest.raises(ValueError, match="alpha"):
        keras_kd.RDrop(classifier(), alpha=-1.0)
    with pytest.raises(ValueError, match="model"):
        keras_kd.RDrop(layers.Dense(3))
