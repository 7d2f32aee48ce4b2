"""`keras_kd.RDrop`'s contract: no hidden state, losses through Keras,
divergence names, NumPy `alpha`, weighted unlabeled data, the tracker.
NumPy references throughout, on every backend."""

import keras
import numpy as np
import pytest
from _cases import log_softmax64, sparse_ce64, symmetric_kl64
from _cases_keras import np_
from keras import layers
from test_rdrop import (
    TAGS,
    TOKENS,
    RowsSeen,
    classifier,
    data,
    token_model,
)

import keras_kd

ALPHA = 2.0


def probe(a, b):
    """A "divergence" of the first copy alone: without dropout its value
    is known in advance, so weighting and averaging can be checked."""
    return keras.ops.sum(keras.ops.square(a), axis=-1)


def probe_values(model, x):
    return (np_(model(x)).astype("float64") ** 2).sum(axis=-1)


def unlabeled(model, divergence=probe, alpha=ALPHA):
    rdrop = keras_kd.RDrop(model, alpha=alpha, divergence=divergence)
    rdrop.compile(optimizer=keras.optimizers.SGD(0.0))
    return rdrop


def supervised(model, alpha=ALPHA, **kwargs):
    rdrop = keras_kd.RDrop(model, alpha=alpha)
    rdrop.compile(
        optimizer=keras.optimizers.SGD(0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        **kwargs,
    )
    return rdrop


# ------------------------------------------------ 1. no hidden state


def test_pairing_comes_from_the_arguments_not_from_the_last_call():
    rdrop = supervised(
        classifier(dropout=0.5),
        metrics=[RowsSeen(), "sparse_categorical_accuracy"],
    )
    x, y = data(rows=6)
    paired = rdrop(x, training=True)
    single = rdrop(x, training=False)  # the most recent call: one pass
    loss = rdrop.compute_loss(x, y, paired, training=True)
    p = np_(paired)
    expected = sparse_ce64(np.repeat(y, 2), p).mean() + ALPHA / 4 * (
        symmetric_kl64(p[0::2], p[1::2]).mean()
    )
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)

    logs = rdrop.compute_metrics(x, y, paired)
    assert float(np_(logs["rows_seen"])) == 6.0  # first copies only
    accuracy = (p[0::2].argmax(-1) == y).mean()
    np.testing.assert_allclose(
        np_(logs["sparse_categorical_accuracy"]), accuracy, atol=1e-6
    )
    assert "rdrop_divergence" in logs

    rdrop(x, training=True)  # now the most recent call is paired
    loss = rdrop.compute_loss(x, y, single, training=False)
    np.testing.assert_allclose(
        np_(loss), sparse_ce64(y, np_(single)).mean(), rtol=1e-5
    )
    logs = rdrop.compute_metrics(x, y, single)
    assert float(np_(logs["rows_seen"])) == 12.0
    assert "rdrop_divergence" not in logs


def test_rows_of_y_pred_must_match_the_training_flag():
    rdrop = supervised(classifier())
    x, y = data(rows=6)
    with pytest.raises(ValueError, match="Expected 12 rows .* Received: y_pr"):
        rdrop.compute_loss(x, y, rdrop(x, training=False), training=True)
    with pytest.raises(ValueError, match="Expected 6 rows"):
        rdrop.compute_loss(x, y, rdrop(x, training=True), training=False)
    tripled = keras.ops.repeat(rdrop(x), 3, axis=0)
    with pytest.raises(ValueError, match="y_pred"):
        rdrop.compute_metrics(x, y, tripled)


def test_evaluate_reports_no_divergence_as_dict_or_list():
    rdrop = supervised(classifier(), metrics=["sparse_categorical_accuracy"])
    x, y = data()
    rdrop.fit(x, y, batch_size=8, epochs=1, verbose=0)
    logs = rdrop.evaluate(x, y, batch_size=5, verbose=0, return_dict=True)
    assert list(logs) == ["loss", "sparse_categorical_accuracy"]
    values = rdrop.evaluate(x, y, batch_size=5, verbose=0)
    np.testing.assert_allclose(values, list(logs.values()), rtol=1e-6)
    logits = np_(rdrop.model(x))
    np.testing.assert_allclose(
        logs["loss"], sparse_ce64(y, logits).mean(), rtol=1e-5
    )


# --------------------------------- 2. the divergence through Loss.__call__


@pytest.mark.parametrize(
    "reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"]
)
def test_masked_weighted_divergence_matches_keras_loss_masking(reduction):
    # Keras' `apply_mask`: a mask weighs total/valid for the averaging
    # reductions and 1 otherwise, times the sample weights.
    divergence = keras_kd.losses.SymmetricKLDivergence(reduction=reduction)
    rdrop = unlabeled(token_model(), divergence=divergence)
    weights = np.array([0.5, 2.0, 1.5], "float32")
    y_pred = rdrop(TOKENS, training=True)
    loss = rdrop.compute_loss(TOKENS, None, y_pred, weights, training=True)
    p = np_(y_pred)
    weighted = (TOKENS > 0) * weights[:, None]
    terms = symmetric_kl64(p[0::2], p[1::2]) * weighted
    expected = {
        "sum_over_batch_size": terms.sum() / (TOKENS > 0).sum(),
        "sum": terms.sum(),
        "mean_with_sample_weight": terms.sum() / weighted.sum(),
    }[reduction]
    np.testing.assert_allclose(np_(loss), ALPHA / 4 * expected, rtol=1e-5)


def test_a_function_divergence_is_averaged_over_rows_with_weights():
    rdrop = unlabeled(classifier(dropout=0.0))
    x, _ = data(rows=6)
    weights = np.linspace(0.0, 2.0, 6).astype("float32")
    loss = rdrop.compute_loss(
        x, None, rdrop(x, training=True), weights, training=True
    )
    expected = ALPHA / 4 * (probe_values(rdrop.model, x) * weights).mean()
    np.testing.assert_allclose(np_(loss), expected, rtol=1e-5)


def test_sample_weights_are_not_changed_in_place():
    # Keras' loss masking multiplies the weights in place on torch; the
    # same tensor used twice must give the same loss twice.
    rdrop = supervised(token_model())
    weights = keras.ops.convert_to_tensor(
        np.array([[1.0, 2.0, 0.5, 1.0, 1.0]] * 3, "float32")
    )
    before = np_(weights).copy()
    y_pred = rdrop(TOKENS, training=True)
    first = rdrop.compute_loss(TOKENS, TAGS, y_pred, weights, training=True)
    second = rdrop.compute_loss(TOKENS, TAGS, y_pred, weights, training=True)
    np.testing.assert_array_equal(np_(weights), before)
    p = np_(y_pred)
    real = TOKENS > 0
    w = before * real
    ce = sparse_ce64(np.repeat(TAGS, 2, axis=0), p) * np.repeat(w, 2, axis=0)
    divergence = symmetric_kl64(p[0::2], p[1::2]) * w
    expected = ce.sum() / (2 * real.sum()) + ALPHA / 4 * (
        divergence.sum() / real.sum()
    )
    np.testing.assert_allclose(np_(first), expected, rtol=1e-5)
    np.testing.assert_allclose(np_(second), expected, rtol=1e-5)


# ------------------------------------------------ 3. divergence names


@pytest.mark.parametrize("name", ["kl", "symmetric_kl"])
def test_divergence_by_name_trains(name):
    rdrop = keras_kd.RDrop(classifier(dropout=0.5), divergence=name)
    assert isinstance(
        rdrop.divergence_losses, keras_kd.losses.SymmetricKLDivergence
    )
    assert rdrop.divergence_losses.from_logits is True
    rdrop.compile(optimizer="sgd")
    x, _ = data(rows=6)
    y_pred = rdrop(x, training=True)
    loss = rdrop.compute_loss(x, None, y_pred, training=True)
    p = np_(y_pred)
    np.testing.assert_allclose(
        np_(loss), 0.25 * symmetric_kl64(p[0::2], p[1::2]).mean(), 1e-5
    )
    history = rdrop.fit(x, batch_size=6, epochs=1, verbose=0).history
    assert np.isfinite(history["loss"]).all()


def test_global_pointer_by_name_and_saved_names(tmp_path):
    rdrop = keras_kd.RDrop(classifier(), divergence="global_pointer")
    assert isinstance(
        rdrop.divergence_losses, keras_kd.losses.GlobalPointerKLDivergence
    )
    rdrop = keras_kd.RDrop(classifier(), alpha=3.0, divergence="kl")
    rdrop.compile(optimizer="sgd")
    x, _ = data()
    rdrop.fit(x, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "named.keras")
    rdrop.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.divergence == "kl" and loaded.alpha == 3.0
    assert isinstance(loaded.optimizer, keras.optimizers.SGD)
    assert np.isfinite(loaded.fit(x, epochs=1, verbose=0).history["loss"])


@pytest.mark.parametrize(
    "divergence",
    [
        "js",
        "KL",
        3,
        np.ones(3),
        ["kl", 3],
        {"a": "global_pointer", "b": "nope"},
        [keras_kd.losses.SymmetricKLDivergence(), None],
        keras_kd.losses.SymmetricKLDivergence(reduction="none"),
    ],
)
def test_invalid_divergence_fails_at_construction(divergence):
    with pytest.raises(ValueError, match="argument `divergence`") as error:
        keras_kd.RDrop(classifier(), divergence=divergence)
    if not isinstance(divergence, keras.losses.Loss):
        assert "'symmetric_kl', 'global_pointer'" in str(error.value)


# ------------------------------------------------------ 4. NumPy alpha


@pytest.mark.parametrize(
    "alpha, expected",
    [(np.float32(0.5), 0.5), (np.float64(2.0), 2.0), (np.int64(3), 3.0)],
)
def test_numpy_alpha_is_accepted(alpha, expected):
    rdrop = unlabeled(classifier(dropout=0.0), alpha=alpha)
    assert rdrop.alpha == expected and type(rdrop.alpha) is float
    x, _ = data(rows=4)
    loss = rdrop.compute_loss(x, None, rdrop(x, training=True))
    np.testing.assert_allclose(
        np_(loss),
        expected / 4 * probe_values(rdrop.model, x).mean(),
        rtol=1e-5,
    )


@pytest.mark.parametrize(
    "alpha", [-1.0, float("nan"), np.float32("inf"), True, "1", None]
)
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="Invalid value for argument `alp"):
        keras_kd.RDrop(classifier(), alpha=alpha)


# -------------------------------------- 5. unlabeled data with weights


def _weighted_case(rows=8):
    x, _ = data(rows=rows)
    weights = np.linspace(0.0, 3.0, rows).astype("float32")
    return x, weights


def test_fit_without_labels_uses_sample_weight():
    model = classifier(dropout=0.0)
    x, weights = _weighted_case()
    values = probe_values(model, x)
    expected = (values * weights).mean()
    assert abs(expected - values.mean()) > 0.1 * values.mean()
    rdrop = unlabeled(model)
    history = rdrop.fit(
        x, sample_weight=weights, batch_size=8, epochs=1, verbose=0
    ).history
    np.testing.assert_allclose(history["rdrop_divergence"], expected, 1e-5)
    np.testing.assert_allclose(history["loss"], ALPHA / 4 * expected, 1e-5)
    # The stand-in labels are not labels: a compiled loss is not applied.
    labelled = supervised(model)
    history = labelled.fit(
        x, sample_weight=weights, batch_size=8, epochs=1, verbose=0
    ).history
    assert set(history) == {"loss", "rdrop_divergence"}
    np.testing.assert_allclose(history["loss"], 0.0, atol=1e-6)


def test_batches_of_x_none_weights_use_the_weights():
    model = classifier(dropout=0.0)
    x, weights = _weighted_case()
    expected = (probe_values(model, x) * weights).mean()

    def batches():
        while True:
            yield x, None, weights

    rdrop = unlabeled(model)
    history = rdrop.fit(
        batches(), steps_per_epoch=2, epochs=1, verbose=0
    ).history
    np.testing.assert_allclose(history["rdrop_divergence"], expected, 1e-5)
    logs = rdrop.train_on_batch(x, None, weights, return_dict=True)
    np.testing.assert_allclose(logs["rdrop_divergence"], expected, 1e-5)


def test_a_tf_data_dataset_of_x_none_weights_uses_the_weights():
    tf = pytest.importorskip("tensorflow")
    model = classifier(dropout=0.0)
    x, weights = _weighted_case()
    expected = (probe_values(model, x) * weights).mean()
    dataset = tf.data.Dataset.from_tensor_slices((x, weights))
    dataset = dataset.batch(8).map(lambda rows, w: (rows, None, w))
    history = unlabeled(model).fit(dataset, epochs=1, verbose=0).history
    np.testing.assert_allclose(history["rdrop_divergence"], expected, 1e-5)


# ------------------------------------------- 6. the divergence tracker


def test_divergence_is_the_example_weighted_epoch_mean():
    model = classifier(dropout=0.0)
    x, _ = data(rows=9)
    x[:4] *= 0.2  # batches of 4, 4 and 1 with different means
    x[8] *= 3.0
    values = probe_values(model, x)
    expected = values.mean()
    batch_means = [values[:4].mean(), values[4:8].mean(), values[8:].mean()]
    assert abs(np.mean(batch_means) - expected) > 0.1 * expected
    rdrop = unlabeled(model)
    stop = keras.callbacks.EarlyStopping("rdrop_divergence", patience=5)
    history = rdrop.fit(
        x, batch_size=4, epochs=2, shuffle=False, verbose=0, callbacks=[stop]
    ).history
    np.testing.assert_allclose(history["rdrop_divergence"], expected, 1e-5)
    np.testing.assert_allclose(history["loss"], ALPHA / 4 * expected, 1e-5)
    assert stop.monitor_op is keras.ops.less  # inferred: lower is better


def test_early_stopping_on_the_divergence_needs_no_mode():
    rdrop = supervised(classifier(dropout=0.5))
    x, y = data()
    stop = keras.callbacks.EarlyStopping("rdrop_divergence", patience=0)
    rdrop.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[stop],
        validation_split=0.25,
    )
    assert stop.monitor_op is keras.ops.less
    assert "val_rdrop_divergence" not in rdrop.history.history


# ----------------------------------------- 8. what worked keeps working


def test_batch_normalization_statistics_are_those_of_one_copy():
    inputs = keras.Input((6,))
    normalized = layers.BatchNormalization(momentum=0.5)(inputs)
    model = keras.Model(inputs, layers.Dense(4)(normalized))
    rdrop = supervised(model)
    x, y = data(rows=8)
    rdrop.train_on_batch(x, y)
    norm = model.layers[1]
    x64 = x.astype("float64")
    np.testing.assert_allclose(
        np_(norm.moving_mean), 0.5 * x64.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        np_(norm.moving_variance), 0.5 + 0.5 * x64.var(0), rtol=1e-5
    )


def test_compile_is_restored_from_a_saved_model(tmp_path):
    rdrop = supervised(classifier(), metrics=["sparse_categorical_accuracy"])
    x, y = data()
    rdrop.fit(x, y, batch_size=8, epochs=1, verbose=0)
    path = str(tmp_path / "compiled.keras")
    rdrop.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.compiled
    assert int(np_(loaded.optimizer.iterations)) == 2
    logits = np_(loaded.model(x))
    logs = loaded.evaluate(x, y, verbose=0, return_dict=True)
    np.testing.assert_allclose(
        logs["loss"], -log_softmax64(logits)[np.arange(16), y].mean(), 1e-5
    )
    assert set(logs) == {"loss", "sparse_categorical_accuracy"}
