"""Decoupled knowledge distillation (DKD) in log space."""

import math

import keras
from keras import ops

from keras_kd.ops._core import (
    _pair,
    _plogp_ratio,
    _times_t_squared,
    log_probabilities,
    validate_temperature,
)


def _target_mask(labels, logits, axis):
    """Boolean one-hot of the target class, shaped like `logits`."""
    if axis not in (-1, len(logits.shape) - 1):
        raise ValueError(
            "Invalid value for argument `axis`. Decoupled KD expects the "
            f"classes on the last axis. Received: axis={axis}"
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
        labels = ops.cast(ops.round(labels), "int32")
    return ops.one_hot(labels, classes, dtype="bool")


def _log_binary(log_p, mask):
    """`[log p_target, log (1 - p_target)]` from log-probabilities.

    `log(1 - p_target)` is the logsumexp of the other classes'
    log-probabilities: no `1 - p` is formed, so it stays accurate when the
    target holds nearly all the mass.
    """
    log_target = ops.sum(ops.where(mask, log_p, 0.0), axis=-1)
    others = ops.where(mask, -math.inf, log_p)
    top = ops.max(others, axis=-1, keepdims=True)
    finite = top > -math.inf
    top = ops.stop_gradient(ops.where(finite, top, 0.0))
    total = ops.sum(ops.exp(others - top), axis=-1)
    finite = ops.squeeze(finite, axis=-1)
    safe_total = ops.where(finite, total, 1.0)
    log_rest = ops.where(
        finite, ops.log(safe_total) + ops.squeeze(top, axis=-1), -math.inf
    )
    return ops.stack([log_target, log_rest], axis=-1)


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
        labels: target class indices `[...]` (or one-hot labels).
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).

    Returns:
        The divergence with the class axis removed.
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    mask = _target_mask(labels, y_true, axis)
    b_true = _log_binary(log_probabilities(y_true, True, temperature), mask)
    b_pred = _log_binary(log_probabilities(y_pred, True, temperature), mask)
    value = ops.sum(_plogp_ratio(b_true, b_pred), axis=-1)
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
        labels: target class indices `[...]` (or one-hot labels).
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).

    Returns:
        The divergence with the class axis removed.
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    mask = _target_mask(labels, y_true, axis)
    log_p = log_probabilities(
        ops.where(mask, -math.inf, y_true), True, temperature
    )
    log_q = log_probabilities(
        ops.where(mask, -math.inf, y_pred), True, temperature
    )
    value = ops.sum(_plogp_ratio(log_p, log_q), axis=-1)
    return _times_t_squared(value, temperature)


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
        labels: target class indices `[...]` (or one-hot labels).
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
    tckd = target_class_kd(y_true, y_pred, labels, temperature, axis)
    nckd = non_target_class_kd(y_true, y_pred, labels, temperature, axis)
    return alpha * tckd + beta * nckd
