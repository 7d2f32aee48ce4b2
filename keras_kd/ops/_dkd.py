"""Decoupled knowledge distillation (DKD) in log space."""

import math

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops._core import (
    _log_softmax,
    _lowest,
    _pair,
    _reduce_max,
    _times_t_squared,
    _weight,
    validate_temperature,
)


def _target_mask(labels, logits, axis):
    """Boolean one-hot of the target class, shaped like `logits`, and
    whether each label is a class index (shaped like the logits without
    the class axis).

    A label outside `[0, classes)` (or NaN) gives an all-False mask row and
    `valid == False`: the callers return NaN for that row, the same on every
    backend (a one-hot op raises on torch and silently gives zeros on
    TensorFlow and JAX).
    """
    if axis not in (-1, len(logits.shape) - 1):
        raise _checks.invalid(
            "axis",
            "the last axis (Decoupled KD expects the classes there)",
            axis,
        )
    labels = ops.convert_to_tensor(labels)
    classes = logits.shape[-1]
    if len(labels.shape) == len(logits.shape):
        if labels.shape[-1] == 1:
            labels = ops.squeeze(labels, axis=-1)
        else:
            # One-hot or soft labels: the target is the most likely class.
            labels = ops.argmax(labels, axis=-1)
    elif len(labels.shape) != len(logits.shape) - 1:
        raise ValueError(
            "Invalid value for argument `labels`. Expected class indices "
            "shaped like the logits without the class axis, or one-hot "
            f"labels shaped like the logits. Received: labels.shape="
            f"{tuple(labels.shape)}, logits.shape={tuple(logits.shape)}"
        )
    if not keras.backend.is_int_dtype(labels.dtype):
        labels = ops.round(labels)
    valid = ops.logical_and(labels >= 0, labels < classes)
    labels = ops.cast(ops.where(valid, labels, 0), "int32")
    mask = ops.expand_dims(labels, -1) == ops.arange(classes, dtype="int32")
    return ops.logical_and(mask, ops.expand_dims(valid, -1)), valid


def _where_valid(valid, value):
    return ops.where(valid, value, math.nan)


def _log_binary(log_p, mask):
    """`[log p_target, log (1 - p_target)]` from finite log-probabilities.

    `log(1 - p_target)` is the logsumexp of the other classes'
    log-probabilities: no `1 - p` is formed, so it stays accurate when the
    target holds nearly all the mass. Entries without mass are the dtype's
    lowest value `L` (see `_log_softmax`), so the logsumexp needs no guard:
    when no other class has mass it is `L + log(count)`, which is `L`.
    """
    lowest = _lowest(log_p.dtype)
    log_target = ops.sum(ops.where(mask, log_p, 0.0), axis=-1)
    others = ops.where(mask, ops.convert_to_tensor(lowest, log_p.dtype), log_p)
    top = ops.stop_gradient(_reduce_max(others, -1))
    total = ops.sum(ops.exp(others - top), axis=-1)
    log_rest = ops.squeeze(top, axis=-1) + ops.log(total)
    return ops.stack([log_target, log_rest], axis=-1)


def _kl_of_logs(log_p, log_q):
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def target_class_kd(y_true, y_pred, labels, temperature=1.0, axis=-1):
    """TCKD: KL of the binary (target, all others) distributions.

    Formula:

    ```
    b = [p_target, 1 - p_target],  p = softmax(logits / T)
    loss = T**2 * KL(b_teacher || b_student)
    ```

    Args:
        y_true: teacher logits `[..., classes]`.
        y_pred: student logits, same shape.
        labels: target class indices `[...]` (or one-hot labels). A row
            whose label is not in `[0, classes)` gives NaN.
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).

    Returns:
        The divergence with the class axis removed.
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    mask, valid = _target_mask(labels, y_true, axis)
    b_true = _log_binary(_log_softmax(y_true, -1, temperature), mask)
    b_pred = _log_binary(_log_softmax(y_pred, -1, temperature), mask)
    value = _where_valid(valid, _kl_of_logs(b_true, b_pred))
    return _times_t_squared(value, temperature)


def non_target_class_kd(y_true, y_pred, labels, temperature=1.0, axis=-1):
    """NCKD: KL of the distributions over the non-target classes.

    The target logit is set to `-inf` and the rest renormalized, which is
    exactly `p_i / (1 - p_target)` for `i != target` without forming it.

    Formula:

    ```
    p_hat = softmax(where(i == target, -inf, logits) / T)
    loss = T**2 * KL(p_hat_teacher || p_hat_student)
    ```

    Args:
        y_true: teacher logits `[..., classes]`.
        y_pred: student logits, same shape.
        labels: target class indices `[...]` (or one-hot labels). A row
            whose label is not in `[0, classes)` gives NaN.
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).

    Returns:
        The divergence with the class axis removed.
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    mask, valid = _target_mask(labels, y_true, axis)
    log_p = _log_softmax(_drop_target(y_true, mask), -1, temperature)
    log_q = _log_softmax(_drop_target(y_pred, mask), -1, temperature)
    value = _where_valid(valid, _kl_of_logs(log_p, log_q))
    return _times_t_squared(value, temperature)


def _drop_target(logits, mask):
    # A NaN target logit is kept: NaN anywhere in a row gives NaN.
    drop = ops.logical_and(mask, ops.logical_not(ops.isnan(logits)))
    return ops.where(drop, -math.inf, logits)


def decoupled_kd(
    y_true, y_pred, labels, alpha=1.0, beta=8.0, temperature=1.0, axis=-1
):
    """Decoupled knowledge distillation (DKD) of Zhao et al. (2022).

    Classic KD splits as `KL = TCKD + (1 - p_target_teacher) * NCKD`; DKD
    drops the coupling factor and weights the two parts freely.

    Formula:

    ```
    loss = alpha * TCKD + beta * NCKD    # each already times T**2
    ```

    Everything is computed from log-probabilities: the non-target
    distribution by masking the target logit to `-inf`, `log(1 - p)` by a
    logsumexp over the other classes. No probability is logged, so
    confident logits (a target probability of 1 in float32) stay exact.

    Args:
        y_true: teacher logits `[..., classes]`.
        y_pred: student logits, same shape.
        labels: target class indices `[...]` (or one-hot labels). A row
            whose label is not in `[0, classes)` gives NaN.
        alpha: weight of TCKD (1.0 in the paper).
        beta: weight of NCKD (8.0 in the paper for CIFAR-100).
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).

    Returns:
        The loss with the class axis removed.

    Reference:
        Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation.
        CVPR 2022. https://arxiv.org/abs/2203.08679
    """
    alpha, beta = _weight("alpha", alpha), _weight("beta", beta)
    tckd = target_class_kd(y_true, y_pred, labels, temperature, axis)
    nckd = non_target_class_kd(y_true, y_pred, labels, temperature, axis)
    return alpha * tckd + beta * nckd
