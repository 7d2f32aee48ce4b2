"""keras_kd.losses as Keras `Loss` objects: reduction, weights, masks,
argument checks, serialization, training, and the pitfalls they remove."""

import math

import keras
import numpy as np
import pytest
from _cases import (
    f32,
    global_pointer_logits,
    kl64,
    log_softmax64,
    logit_pairs,
    mlce64,
    sparse_labels,
)
from _cases_keras import (
    BACKEND,
    close,
    np_,
)

from keras_kd import losses


def sequence_pair(seed=0, batch=2, length=4, vocab=5):
    """Teacher/student token logits `[batch, length, vocab]` and a padding
    mask `[batch, length]`; padded student positions are all zeros."""
    rng = np.random.default_rng(seed)
    t = f32(2.0 * rng.normal(size=(batch, length, vocab)))
    s = f32(2.0 * rng.normal(size=(batch, length, vocab)))
    mask = np.ones((batch, length), bool)
    mask[0, 3:] = False
    mask[1, 2:] = False
    s[~mask] = 0.0
    return t, s, mask


# --------------------------------------------------------- Loss behaviour


def test_reduction_none_shapes():
    t, s = logit_pairs()["random"]
    assert losses.KLDivergence(reduction="none")(t, s).shape == (5,)
    t3, s3, _ = sequence_pair()
    for cls in (
        losses.KLDivergence,
        losses.ReverseKLDivergence,
        losses.SymmetricKLDivergence,
        losses.JensenShannonDivergence,
    ):
        assert cls(reduction="none")(t3, s3).shape == (2, 4), cls
    t4, s4, labels = global_pointer_logits()
    gp = losses.GlobalPointerKLDivergence(reduction="none")
    assert gp(t4, s4).shape == (2, 3)
    mlce = losses.MultilabelCategoricalCrossentropy(reduction="none")
    assert mlce(labels, s4).shape == (2, 3)


def test_reductions_and_sample_weights():
    t, s = logit_pairs()["random"]
    per_row = kl64(t, s, 2.0)
    loss = losses.KLDivergence(temperature=2.0)
    close(loss(t, s), per_row.mean())
    close(losses.KLDivergence(2.0, reduction="sum")(t, s), per_row.sum())
    close(loss(t, s, sample_weight=0.5), 0.5 * per_row.mean())
    weights = f32([1.0, 0.0, 2.0, 0.5, 0.0])
    close(loss(t, s, sample_weight=weights), (weights * per_row).mean())
    weighted = losses.KLDivergence(2.0, reduction="mean_with_sample_weight")
    close(
        weighted(t, s, sample_weight=weights),
        (weights * per_row).sum() / weights.sum(),
    )


def test_keras_mask_on_predictions_gives_per_token_mean():
    t, s, mask = sequence_pair()
    masked = keras.layers.Masking(mask_value=0.0)(s)
    per_token = kl64(t, s)
    value = losses.KLDivergence()(t, masked)
    close(value, per_token[mask].mean())
    assert abs(float(np_(value)) - per_token.mean()) > 1e-3


def test_padding_mask_as_sample_weight():
    t, s, mask = sequence_pair()
    per_token = kl64(t, s)
    weights = f32(mask)
    # the per-token mean over real tokens
    token_mean = losses.KLDivergence(reduction="mean_with_sample_weight")
    close(token_mean(t, s, sample_weight=weights), per_token[mask].mean())
    # the default divides by every position, padded ones included
    close(
        losses.KLDivergence()(t, s, sample_weight=weights),
        per_token[mask].sum() / mask.size,
    )
    # torch's "batchmean": the sum over real tokens divided by the batch
    total = losses.KLDivergence(reduction="sum")(t, s, sample_weight=weights)
    close(total / t.shape[0], per_token[mask].sum() / t.shape[0])


@pytest.mark.skipif(BACKEND != "torch", reason="torch peer")
def test_rank3_batchmean_matches_torch():
    import torch
    import torch.nn.functional as F

    t, s, _ = sequence_pair()
    temp = 2.0
    expected = (
        F.kl_div(
            F.log_softmax(torch.tensor(s) / temp, -1),
            F.softmax(torch.tensor(t) / temp, -1),
            reduction="batchmean",
        )
        * temp**2
    )
    loss = losses.KLDivergence(temperature=temp, reduction="sum")
    close(loss(t, s) / t.shape[0], expected.item())


def test_half_precision_inputs_give_float32():
    t, s = logit_pairs()["random"]
    for dtype in ("float16", "bfloat16"):
        t16, s16 = (keras.ops.convert_to_tensor(x, dtype) for x in (t, s))
        value = losses.SymmetricKLDivergence(temperature=2.0)(t16, s16)
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        tr, sr = (np_(keras.ops.cast(x, "float32")) for x in (t16, s16))
        expected = kl64(tr, sr, 2.0) + kl64(sr, tr, 2.0)
        assert np.isfinite(np_(value))
        close(value, expected.mean())


def test_temperature_variable_is_read_at_call_time():
    t, s = logit_pairs()["random"]
    temperature = keras.Variable(2.0, trainable=False)
    loss = losses.KLDivergence(temperature=temperature)
    close(loss(t, s), kl64(t, s, 2.0).mean())
    temperature.assign(4.0)
    close(loss(t, s), kl64(t, s, 4.0).mean())
    assert loss.get_config()["temperature"] == 4.0


# ------------------------------------------------------ invalid arguments


@pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf, True])
def test_invalid_temperature(value):
    for cls in (
        losses.KLDivergence,
        losses.SymmetricKLDivergence,
        losses.JensenShannonDivergence,
        losses.GlobalPointerKLDivergence,
    ):
        with pytest.raises(ValueError, match="`temperature`") as info:
            cls(temperature=value)
        assert f"temperature={value}" in str(info.value)


@pytest.mark.parametrize("value", [-0.1, 1.5, math.nan])
def test_invalid_beta(value):
    with pytest.raises(ValueError, match=f"`beta`.*beta={value}"):
        losses.JensenShannonDivergence(beta=value)


def test_mismatched_shapes():
    t = np.zeros((2, 3), "float32")
    s = np.zeros((2, 4), "float32")
    for loss in (
        losses.KLDivergence(),
        losses.JensenShannonDivergence(),
        losses.GlobalPointerKLDivergence(),
        losses.MultilabelCategoricalCrossentropy(),
        losses.RDropCategoricalCrossentropy(),
    ):
        with pytest.raises(ValueError) as info:
            loss(t, s)
        message = str(info.value)
        assert "(2, 3)" in message and "(2, 4)" in message, loss


# --------------------------------------------------------- serialization


def _loss_cases():
    t, s = logit_pairs()["random"]
    t4, s4, labels = global_pointer_logits()
    indices, dense = sparse_labels(rows=(5,), classes=7)
    one_hot = np.eye(7, dtype="float32")[[0, 0, 3, 3]]
    return [
        (losses.KLDivergence(temperature=3.0, reduction="sum"), t, s),
        (losses.ReverseKLDivergence(temperature=2.0), t, s),
        (losses.SymmetricKLDivergence(temperature=1.5), t, s),
        (losses.JensenShannonDivergence(beta=0.3, temperature=2.0), t, s),
        (losses.GlobalPointerKLDivergence(temperature=2.0), t4, s4),
        (losses.MultilabelCategoricalCrossentropy(), labels, s4),
        (losses.SparseMultilabelCategoricalCrossentropy(), indices, s),
        (
            losses.RDropCategoricalCrossentropy(alpha=4.0, from_logits=True),
            one_hot,
            s[:4],
        ),
        (
            losses.RDropSparseCategoricalCrossentropy(alpha=2.0),
            np.array([1, 1, 2, 2]),
            np.exp(log_softmax64(s[:4])).astype("float32"),
        ),
    ]


def test_every_public_loss_is_covered():
    # the divergence, multi-label and R-Drop modules; other loss modules
    # (feature and decoupled KD losses) have their own tests
    modules = {
        "keras_kd.losses.divergences",
        "keras_kd.losses.multilabel",
        "keras_kd.losses.rdrop",
    }
    public = {
        name
        for name in dir(losses)
        if isinstance(getattr(losses, name), type)
        and issubclass(getattr(losses, name), keras.losses.Loss)
        and getattr(losses, name).__module__ in modules
    }
    assert public == {type(loss).__name__ for loss, _, _ in _loss_cases()}


def test_serialize_round_trip():
    for loss, y_true, y_pred in _loss_cases():
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert type(restored) is type(loss)
        assert restored.get_config() == loss.get_config()
        value = np_(loss(y_true, y_pred))
        assert np.all(np.isfinite(value))
        np.testing.assert_array_equal(np_(restored(y_true, y_pred)), value)


def test_saved_model_restores_loss(tmp_path):
    for i, (loss, _, _) in enumerate(_loss_cases()):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.compile(optimizer="sgd", loss=loss)
        path = tmp_path / f"model_{i}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        assert type(loaded.loss) is type(loss)
        assert loaded.loss.get_config() == loss.get_config()


# --------------------------------------------------------------- training


def _fit_losses(model, loss, x, y, epochs=8, batch_size=16):
    model.compile(optimizer=keras.optimizers.Adam(0.1), loss=loss)
    history = model.fit(
        x, y, epochs=epochs, batch_size=batch_size, shuffle=False, verbose=0
    )
    return history.history["loss"]


def test_fit_with_kl_divergence():
    rng = np.random.default_rng(0)
    x = f32(rng.normal(size=(32, 4)))
    teacher_logits = f32(x @ (3.0 * rng.normal(size=(4, 5))))
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    history = _fit_losses(
        model, losses.KLDivergence(temperature=2.0), x, teacher_logits
    )
    assert all(np.isfinite(history))
    assert history[-1] < 0.5 * history[0]


def test_fit_with_sparse_multilabel_loss():
    rng = np.random.default_rng(1)
    x = f32(rng.normal(size=(32, 4)))
    dense = (x @ rng.normal(size=(4, 6))) > 0.5
    indices = np.full((32, 6), -1, "int32")
    for i, row in enumerate(dense):
        positives = np.flatnonzero(row)
        indices[i, : len(positives)] = positives
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6)])
    loss = losses.SparseMultilabelCategoricalCrossentropy()
    history = _fit_losses(model, loss, x, indices)
    assert history[-1] < 0.7 * history[0]
    labels = f32(dense)
    close(
        loss(indices, model(x)),
        mlce64(labels, np_(model(x))).mean(),
    )


# ------------------------------------- pitfalls docs/losses.md lists


def test_pitfall_probability_space_kl_of_raw_logits():
    # keras.losses.KLDivergence expects probabilities; given temperature-
    # scaled logits it clips them to [1e-7, 1] and returns a negative "KL".
    t = f32([[1, 2, 3], [4, 5, 6]])
    s = f32([[1.2, 2.1, 2.9], [3.8, 5.2, 6.1]])
    peer = float(np_(keras.losses.KLDivergence()(t / 2.0, s / 2.0)))
    assert abs(peer - (-0.0456)) < 5e-5
    ours = float(np_(losses.KLDivergence(temperature=2.0)(t, s)))
    assert abs(ours - 0.008507) < 1e-6


def test_pitfall_clipping_at_1e7():
    t, s = f32([[30.0, 0.0, -30.0]]), f32([[0.0, 0.0, 30.0]])
    softmax = keras.ops.softmax
    peer = float(np_(keras.losses.KLDivergence()(softmax(t), softmax(s))))
    assert abs(peer - 16.12) < 5e-3
    ours = float(np_(losses.KLDivergence()(t, s)))
    assert abs(ours - kl64(t, s)[0]) < 1e-5
    assert abs(ours - 30.0) < 1e-5


@pytest.mark.skipif(BACKEND != "torch", reason="torch peer")
def test_pitfall_torch_mean_and_masked_entries():
    import torch
    import torch.nn.functional as F

    t, s = logit_pairs()["random"]
    log_q, p = (
        F.log_softmax(torch.tensor(s), -1),
        F.softmax(torch.tensor(t), -1),
    )
    ours = float(np_(losses.KLDivergence(reduction="mean")(t, s)))
    batchmean = F.kl_div(log_q, p, reduction="batchmean").item()
    mean = F.kl_div(log_q, p, reduction="mean").item()
    assert abs(ours - batchmean) < 1e-5
    # torch's "mean" divides by the class count as well
    assert abs(mean * t.shape[-1] - batchmean) < 1e-5
    t, s = logit_pairs()["masked"]
    log_q, p = (
        F.log_softmax(torch.tensor(s), -1),
        F.softmax(torch.tensor(t), -1),
    )
    assert math.isnan(F.kl_div(log_q, p, reduction="batchmean").item())
    ours = np_(losses.KLDivergence(reduction="none")(t, s))
    close(ours, kl64(t, s))
