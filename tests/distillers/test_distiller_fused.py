"""Hinton's two terms as one op: `ops.sparse_crossentropy_and_kl_divergence`
against float64 NumPy and against the two separate losses, and the
Distiller's fused training step against its unfused twin."""

import math

import keras
import numpy as np
import pytest
from _cases import kl64, log_softmax64
from _cases_keras import BACKEND, backend_grad, close, np_
from _distiller_models import data, pair, sparse_ce

import keras_kd
from keras_kd import ops as kd

T = 3.0


def _case(shape=(6, 7), scale=2.0, seed=0):
    rng = np.random.default_rng(seed)
    t = (rng.normal(size=shape) * scale).astype("float32")
    s = (rng.normal(size=shape) * scale).astype("float32")
    labels = rng.integers(0, shape[-1], size=shape[:-1])
    return t, s, labels


def _ce64(labels, s):
    log_q = log_softmax64(s)
    return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]


def _grad64(labels, t, s, up_ce, up_kd, temperature=T):
    q1 = np.exp(log_softmax64(s))
    onehot = np.eye(s.shape[-1])[labels]
    p = np.exp(log_softmax64(np.asarray(t, "f8") / temperature))
    q = np.exp(log_softmax64(np.asarray(s, "f8") / temperature))
    return up_ce[..., None] * (q1 - onehot) + up_kd[..., None] * (
        temperature * (q - p)
    )


# --------------------------------------------------------------------- op


@pytest.mark.parametrize("shape", [(6, 7), (2, 3, 11), (4, 1000)])
def test_values_match_float64(shape):
    t, s, labels = _case(shape)
    ce, kl = kd.sparse_crossentropy_and_kl_divergence(labels, t, s, T)
    close(ce, _ce64(labels, s))
    close(kl, kl64(t, s, T))
    assert tuple(ce.shape) == tuple(kl.shape) == shape[:-1]


def test_divergence_is_the_kl_divergence_and_temperature_may_be_a_variable():
    t, s, labels = _case()
    for precise in (False, True):
        variable = keras.Variable(T)
        expected = kd.kl_divergence(t, s, temperature=variable, precise=precise)
        _, kl = kd.sparse_crossentropy_and_kl_divergence(
            labels, t, s, variable, precise=precise
        )
        close(kl, np_(expected), rtol=1e-6, atol=0)


def test_precise_divergence_near_the_teacher():
    rng = np.random.default_rng(5)
    t = rng.normal(size=(4, 50)).astype("float32")
    s = (t + 1e-3 * rng.normal(size=t.shape)).astype("float32")
    labels = rng.integers(0, 50, size=4)
    _, kl = kd.sparse_crossentropy_and_kl_divergence(
        labels, t, s, 2.0, precise=True
    )
    expected = kl64(t.astype("f8"), s.astype("f8"), 2.0)
    np.testing.assert_allclose(np_(kl), expected, rtol=1e-5)


def test_gradients_weight_each_term_by_its_own_upstream():
    t, s, labels = _case((5, 9), seed=1)
    up_ce = np.linspace(0.1, 1.0, 5).astype("float32")
    up_kd = np.linspace(2.0, -1.0, 5).astype("float32")

    def weighted(t_, s_):
        ce, kl = kd.sparse_crossentropy_and_kl_divergence(labels, t_, s_, T)
        return ce * keras.ops.convert_to_tensor(
            up_ce
        ) + kl * keras.ops.convert_to_tensor(up_kd)

    grad_t, grad_s = backend_grad(weighted, t, s)
    close(grad_s, _grad64(labels, t, s, up_ce, up_kd), atol=1e-6)
    # The teacher's gradient is the KL's own.
    expected_t = backend_grad(
        lambda t_, s_: (
            kd.kl_divergence(t_, s_, temperature=T)
            * keras.ops.convert_to_tensor(up_kd)
        ),
        t,
        s,
    )[0]
    close(grad_t, expected_t, atol=1e-6)


def test_labels_with_a_trailing_axis_and_float_labels():
    t, s, labels = _case()
    ce, _ = kd.sparse_crossentropy_and_kl_divergence(labels, t, s, T)
    for other in (labels[:, None], labels.astype("float32")):
        again, _ = kd.sparse_crossentropy_and_kl_divergence(other, t, s, T)
        close(again, np_(ce), rtol=0, atol=0)


def test_masked_entries_invalid_labels_and_nan_rows():
    t, s, labels = _case((5, 6), seed=2)
    # Masked on both sides, not the label: no mass, no contribution.
    s[0, (labels[0] + 1) % 6] = t[0, (labels[0] + 1) % 6] = -np.inf
    t[1, :3] = -np.inf
    s[2, 1] = np.nan
    labels[3] = 6  # outside [0, 6)
    labels[4] = -1

    def both(t_, s_):
        ce, kl = kd.sparse_crossentropy_and_kl_divergence(labels, t_, s_, T)
        return keras.ops.where(keras.ops.isnan(ce + kl), 0.0, ce + kl)

    ce, kl = kd.sparse_crossentropy_and_kl_divergence(labels, t, s, T)
    ce, kl = np_(ce), np_(kl)
    assert np.all(np.isfinite(ce[:2])) and np.all(np.isfinite(kl[:2]))
    finite = np.where(np.isfinite(s[0]), s[0], -1e30)
    assert math.isclose(ce[0], _ce64(labels[:1], finite[None])[0], rel_tol=1e-5)
    assert np.all(np.isnan(ce[2:])) and np.all(np.isnan(kl[2:]))
    grad_t, grad_s = backend_grad(both, t, s)
    assert np.all(np.isfinite(grad_s[:2]))
    assert np.all(np.isfinite(np.delete(grad_t, 2, axis=0)))  # 2: NaN row
    np.testing.assert_array_equal(grad_s[3:], 0.0)


def test_bad_labels_shape_is_a_clear_error():
    t, s, _ = _case()
    with pytest.raises(ValueError, match="labels"):
        kd.sparse_crossentropy_and_kl_divergence(np.zeros((6, 2, 2)), t, s)
    with pytest.raises(ValueError, match="temperature"):
        kd.sparse_crossentropy_and_kl_divergence(np.zeros(6), t, s, -1.0)


# -------------------------------------------------------------- Distiller


class Unfused(keras_kd.Distiller):
    """The same Distiller computing its two terms as two losses (an
    override of a term turns the fused path off)."""

    def compute_student_loss(self, *args, **kwargs):
        return super().compute_student_loss(*args, **kwargs)


def _trained(
    cls, weights, epochs=3, compile_kwargs=(), reductions=None, **fit_kwargs
):
    teacher, student = pair()
    student.set_weights(weights[0])
    teacher.set_weights(weights[1])
    distiller = cls(student, teacher)
    student_reduction, kd_reduction = reductions or (
        "sum_over_batch_size",
        "sum_over_batch_size",
    )
    distiller.compile(
        keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=student_reduction
        ),
        distillation_loss=keras_kd.losses.KLDivergence(
            temperature=T, reduction=kd_reduction
        ),
        alpha=0.3,
        metrics=["sparse_categorical_accuracy"],
        **dict(compile_kwargs),
    )
    x, y = data(32)
    history = distiller.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        shuffle=False,
        verbose=0,
        **fit_kwargs,
    ).history
    return history, student.get_weights()


@pytest.mark.parametrize(
    "weighted, reductions",
    [
        (False, None),
        (True, None),
        (True, ("sum", "mean_with_sample_weight")),
    ],
)
def test_fused_training_matches_the_two_losses(weighted, reductions):
    teacher, student = pair()
    weights = (student.get_weights(), teacher.get_weights())
    kwargs = {"reductions": reductions}
    if weighted:
        kwargs["sample_weight"] = np.linspace(0.0, 2.0, 32).astype("float32")
    fused, fused_weights = _trained(keras_kd.Distiller, weights, **kwargs)
    plain, plain_weights = _trained(Unfused, weights, **kwargs)
    assert set(fused) == set(plain)
    for key in plain:
        np.testing.assert_allclose(fused[key], plain[key], rtol=2e-5, atol=1e-6)
    for a, b in zip(fused_weights, plain_weights):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def _counting(monkeypatch):
    calls = []
    real = keras_kd.ops.sparse_crossentropy_and_kl_divergence

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    # The fused path looks the op up on `keras_kd.ops` at each call.
    monkeypatch.setattr(
        keras_kd.ops, "sparse_crossentropy_and_kl_divergence", counted
    )
    return calls


def _fit_counts(monkeypatch, cls=keras_kd.Distiller, loss=None, **compile_kw):
    calls = _counting(monkeypatch)
    teacher, student = pair()
    distiller = cls(student, teacher)
    distiller.compile(
        "sgd",
        loss=sparse_ce() if loss is None else loss,
        run_eagerly=True,
        **compile_kw,
    )
    x, y = data(8)
    distiller.fit(x, y, batch_size=4, epochs=1, verbose=0)
    return len(calls)


def test_fused_path_is_taken_in_training_steps(monkeypatch):
    # Off on torch, where the two losses measured faster.
    assert _fit_counts(monkeypatch) == (0 if BACKEND == "torch" else 2)


@pytest.mark.parametrize(
    "case",
    [
        "probabilities",
        "ignore_class",
        "string",
        "loss_weights",
        "override",
        "reverse_kl",
        "kl_subclass",
    ],
)
def test_fused_path_is_not_taken_where_it_does_not_apply(monkeypatch, case):
    kwargs = {}
    cls = keras_kd.Distiller
    if case == "probabilities":
        kwargs["loss"] = keras.losses.SparseCategoricalCrossentropy()
    elif case == "ignore_class":
        kwargs["loss"] = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=0
        )
    elif case == "string":
        kwargs["loss"] = "sparse_categorical_crossentropy"
    elif case == "loss_weights":
        kwargs["loss_weights"] = 0.5
    elif case == "override":
        cls = Unfused
    elif case == "reverse_kl":
        kwargs["distillation_loss"] = keras_kd.losses.ReverseKLDivergence()
    else:
        # A KLDivergence whose math is its own names no divergence.
        kwargs["distillation_loss"] = HalfKL()
    assert _fit_counts(monkeypatch, cls=cls, **kwargs) == 0


class HalfKL(keras_kd.losses.KLDivergence):
    def call(self, y_true, y_pred):
        return 0.5 * super().call(y_true, y_pred)


def test_fused_path_falls_back_for_a_masked_student(monkeypatch):
    calls = _counting(monkeypatch)
    tokens = keras.Input((5,), dtype="int32")

    def lm(name):
        h = keras.layers.Embedding(10, 4, mask_zero=True)(tokens)
        return keras.Model(tokens, keras.layers.Dense(10)(h), name=name)

    teacher, student = lm("teacher"), lm("student")
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce(), run_eagerly=True)
    x = np.array([[1, 2, 3, 0, 0], [4, 5, 0, 0, 0]], "int32")
    history = distiller.fit(x, x, epochs=1, verbose=0).history
    assert calls == [] and np.isfinite(history["loss"][0])


@pytest.mark.skipif(BACKEND != "torch", reason="torch second order")
def test_torch_second_order_uses_the_plain_formula():
    import torch

    t, s, labels = _case((3, 5), seed=4)
    s_ = torch.tensor(s, requires_grad=True)
    ce, kl = kd.sparse_crossentropy_and_kl_divergence(labels, t, s_, T)
    (grad,) = torch.autograd.grad((ce + kl).sum(), s_, create_graph=True)
    (hess_row,) = torch.autograd.grad(grad[0, 0], s_)
    assert torch.all(torch.isfinite(hess_row))
    assert float(hess_row[0, 0]) > 0.0


@pytest.mark.skipif(BACKEND == "torch", reason="the fused path is off")
@pytest.mark.parametrize("jit_compile", [True, False])
def test_fused_training_matches_under_mixed_precision(jit_compile):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        teacher, student = pair()
        weights = (student.get_weights(), teacher.get_weights())
        kwargs = {"jit_compile": jit_compile}
        fused, _ = _trained(keras_kd.Distiller, weights, 2, kwargs)
        plain, _ = _trained(Unfused, weights, 2, kwargs)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    # The students' products are bfloat16 (a relative 4e-3 per rounding):
    # gradients that agree in float32 round differently there.
    for key in plain:
        np.testing.assert_allclose(fused[key], plain[key], rtol=1e-2)
