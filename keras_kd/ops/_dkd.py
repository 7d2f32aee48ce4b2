"""Decoupled knowledge distillation (DKD) in log space."""

import math

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops import _log_ratio as lr
from keras_kd.ops._core import (
    _log_softmax,
    _lowest,
    _pair,
    _reduce_max,
    _times_t_squared,
    _weight,
    validate_temperature,
)
from keras_kd.ops._gradients import resolve_precise, with_gradient
from keras_kd.ops._softmax_terms import _non_negative


def _target_mask(labels, logits, axis):
    """Boolean one-hot of the target class, shaped like `logits`, and
    whether each label is a class index (shaped like the logits without
    the class axis).

    A label outside `[0, classes)` (or NaN) gives an all-False mask row and
    `valid == False`: the callers return NaN for that row, the same on every
    backend (a one-hot op raises on torch and silently gives zeros on
    TensorFlow and JAX).
    """
    labels, valid = _class_indices(labels, logits, axis)
    classes = logits.shape[-1]
    mask = ops.expand_dims(labels, -1) == ops.arange(classes, dtype="int32")
    return ops.logical_and(mask, ops.expand_dims(valid, -1)), valid


def _class_indices(labels, logits, axis=-1):
    """`(labels, valid)`: the labels as int32 class indices (0 where not
    valid) and whether each is in `[0, classes)`; see `_target_mask`."""
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
    return ops.cast(ops.where(valid, labels, 0), "int32"), valid


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


def target_class_kd(
    y_true, y_pred, labels, temperature=1.0, axis=-1, precise=None
):
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
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`; see `decoupled_kd`.

    Returns:
        The divergence with the class axis removed.
    """
    return _dkd(y_true, y_pred, labels, 1.0, 0.0, temperature, axis, precise)


def non_target_class_kd(
    y_true, y_pred, labels, temperature=1.0, axis=-1, precise=None
):
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
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`; see `decoupled_kd`.

    Returns:
        The divergence with the class axis removed.
    """
    return _dkd(y_true, y_pred, labels, 0.0, 1.0, temperature, axis, precise)


def _drop_target(logits, mask):
    # A NaN target logit is kept: NaN anywhere in a row gives NaN.
    drop = ops.logical_and(mask, ops.logical_not(ops.isnan(logits)))
    return ops.where(drop, -math.inf, logits)


def decoupled_kd(
    y_true,
    y_pred,
    labels,
    alpha=1.0,
    beta=8.0,
    temperature=1.0,
    axis=-1,
    precise=None,
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
    The gradient is a closed form (`_dkd_terms`). On the precise path both
    parts come from the log-ratio `u = log P - log Q` of the full
    distributions, exact to rounding (`keras_kd.ops`): with
    `v = log((1 - p_t) / (1 - q_t))`, `TCKD = q_t phi(u_t) +
    (1 - q_t) phi(v)` and `NCKD = sum_{i != t} q_hat_i phi(u_i - v)`.

    Args:
        y_true: teacher logits `[..., classes]`.
        y_pred: student logits, same shape.
        labels: target class indices `[...]` (or one-hot labels). A row
            whose label is not in `[0, classes)` gives NaN.
        alpha: weight of TCKD (1.0 in the paper).
        beta: weight of NCKD (8.0 in the paper for CIFAR-100).
        temperature: softening temperature `T > 0`.
        axis: the class axis (must be the last).
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`.

    Returns:
        The loss with the class axis removed.

    Reference:
        Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation.
        CVPR 2022. https://arxiv.org/abs/2203.08679
    """
    alpha, beta = _weight("alpha", alpha), _weight("beta", beta)
    return _dkd(y_true, y_pred, labels, alpha, beta, temperature, axis, precise)


def _dkd(y_true, y_pred, labels, alpha, beta, temperature, axis, precise):
    temperature = validate_temperature(temperature)
    precise = resolve_precise(precise)
    t, s = _pair(y_true, y_pred)
    mask, valid = _target_mask(labels, t, axis)
    dtype = t.dtype
    # Python numbers stay in the closures; tensors (a temperature or a
    # weight in a variable) travel as arguments without a gradient.
    fixed = {"temperature": temperature, "alpha": alpha, "beta": beta}
    tensors = {k: v for k, v in fixed.items() if not isinstance(v, float)}
    names = sorted(tensors)
    constants = [ops.cast(mask, dtype), ops.cast(valid, dtype)]
    constants += [ops.cast(tensors[k], dtype) for k in names]

    def unpack(extra):
        found = dict(fixed, **dict(zip(names, extra[2:])))
        return extra[0] > 0.5, extra[1] > 0.5, found

    def forward(t, s, *extra, eager):
        mask, valid, found = unpack(extra)
        temp = found["temperature"]
        tckd, nckd, grads = _dkd_terms(t, s, mask, temp, precise)
        alpha, beta = found["alpha"], found["beta"]
        value = (alpha * tckd + beta * nckd) * (temp * temp)
        value = ops.where(valid, value, math.nan)

        def weighted(upstream):
            up = ops.expand_dims(ops.where(valid, upstream, 0.0), -1) * temp
            (ta, tb), (na, nb) = grads()
            return (alpha * tb + beta * nb) * up, (alpha * ta + beta * na) * up

        return value, weighted

    def reference(t, s, *extra):
        mask, valid, found = unpack(extra)
        temp = found["temperature"]
        tckd, nckd = _reference_terms(t, s, mask, temp)
        value = found["alpha"] * tckd + found["beta"] * nckd
        return ops.where(valid, _times_t_squared(value, temp), math.nan)

    return with_gradient(forward, reference, (t, s), constants)


def _dkd_terms(t, s, mask, temperature, precise):
    """TCKD and NCKD per row (without `T**2`) and a function returning
    their gradients `((d TCKD / da, d TCKD / db), (d NCKD / da, ...))`
    with respect to `a = s / T` and `b = t / T`:

    ```
    d TCKD / da = (q_t - p_t) (onehot - q_hat)
    d TCKD / db = g p_t (1 - p_t) (onehot - p_hat),
                  g = log(p_t / q_t) - log((1 - p_t) / (1 - q_t))
    d NCKD / da = q_hat - p_hat       d NCKD / db = p_hat (u_hat - NCKD)
    ```
    """
    lowest = _lowest(t.dtype)
    log_p = _log_softmax(t, -1, temperature)
    log_q = _log_softmax(s, -1, temperature)
    (lpt, l1p), (lqt, l1q) = (
        _binary_parts(log_p, mask),
        _binary_parts(log_q, mask),
    )
    # The non-target distributions, straight from the logits.
    hat_lp = _log_softmax(_drop_target(t, mask), -1, temperature)
    hat_lq = _log_softmax(_drop_target(s, mask), -1, temperature)
    hat_p, hat_q = ops.exp(hat_lp), ops.exp(hat_lq)
    pt, qt = ops.exp(lpt), ops.exp(lqt)
    if precise:
        pair = lr.softmax_pair(t, s, temperature, -1, True)
        u_t = ops.sum(ops.where(mask, pair.u, 0.0), axis=-1, keepdims=True)
        # p_t - q_t = q_t expm1(u_t), exact; the other classes hold the
        # opposite difference, so v = log((1 - p_t) / (1 - q_t)) =
        # log1p((q_t - p_t) / (1 - q_t)) has nothing to cancel while that
        # ratio is small (and 1 / (1 - q_t) finite); elsewhere the plain
        # difference of the logs has nothing to cancel either.
        gap = -lr.expm1_times(u_t, qt, pt)  # q_t - p_t
        scale = ops.exp(-ops.where(l1q > -80.0, l1q, 0.0))
        ratio = gap * scale
        near = ops.logical_and(l1q > -80.0, ops.abs(ratio) < 0.5)
        v = ops.where(near, ops.log1p(ops.where(near, ratio, 0.0)), l1p - l1q)
        tckd = lr.weighted_phi(u_t, qt, pt) + lr.weighted_phi(
            v, ops.exp(l1q), ops.exp(l1p)
        )
        hat_u = ops.where(mask, 0.0, pair.u - v)
        nckd = ops.sum(lr.weighted_phi(hat_u, hat_q, hat_p), -1, True)
        log_gap = u_t - v
        hat_gap = lr.expm1_times(hat_u, hat_q, hat_p)  # p_hat - q_hat
    else:
        b_p = ops.concatenate([lpt, l1p], axis=-1)
        b_q = ops.concatenate([lqt, l1q], axis=-1)
        tckd = ops.sum(ops.exp(b_p) * (b_p - b_q), axis=-1, keepdims=True)
        hat_u = hat_lp - hat_lq
        nckd = ops.sum(hat_p * hat_u, axis=-1, keepdims=True)
        gap = qt - pt
        log_gap = (lpt - lqt) - (l1p - l1q)
        hat_gap = hat_p - hat_q
    # Rounding can leave the fast path's sums a few ulp below 0.
    tckd, nckd = _non_negative(tckd), _non_negative(nckd)
    # No non-target mass on one side: NCKD has nothing that can move.
    hat_regular = ops.logical_and(
        _reduce_max(hat_lp, -1) != lowest, _reduce_max(hat_lq, -1) != lowest
    )
    onehot = ops.cast(mask, t.dtype)

    def grads():
        tckd_a = gap * (onehot - hat_q)
        tckd_b = log_gap * ops.exp(lpt + l1p) * (onehot - hat_p)
        nckd_a = ops.where(hat_regular, -hat_gap, 0.0)
        nckd_b = hat_p * hat_u - hat_p * nckd
        nckd_b = ops.where(hat_regular, nckd_b, 0.0)
        return (tckd_a, tckd_b), (nckd_a, nckd_b)

    squeeze = lambda x: ops.squeeze(x, axis=-1)  # noqa: E731
    return squeeze(tckd), squeeze(nckd), grads


def _binary_parts(log_p, mask):
    """`(log p_target, log (1 - p_target))`, each `[..., 1]`."""
    both = _log_binary(log_p, mask)
    return both[..., :1], both[..., 1:]


def _reference_terms(t, s, mask, temperature):
    """TCKD and NCKD by the plain formulas (autodiff; torch's second-order
    fallback)."""
    b_true = _log_binary(_log_softmax(t, -1, temperature), mask)
    b_pred = _log_binary(_log_softmax(s, -1, temperature), mask)
    log_p = _log_softmax(_drop_target(t, mask), -1, temperature)
    log_q = _log_softmax(_drop_target(s, mask), -1, temperature)
    return _kl_of_logs(b_true, b_pred), _kl_of_logs(log_p, log_q)


def _kl_of_logs(log_p, log_q):
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)
