"""The R-Drop loss per row (cross-entropy plus the pair's symmetric KL)
from one log-softmax, with its closed-form gradient."""

import math

from keras import ops

from keras_kd.ops import _log_ratio as lr
from keras_kd.ops._core import (
    _as_float,
    _check_same_shape,
    _log_softmax,
    _logits_of,
)
from keras_kd.ops._gradients import resolve_precise, with_gradient
from keras_kd.ops._softmax_terms import symmetric_kl_terms


def rdrop_cross_entropy(
    y_true, y_pred, alpha, from_logits, sparse, precise=None
):
    """Per-row R-Drop loss: cross-entropy plus `alpha / 4` times the
    symmetric KL of the row's pair, on a batch `[x0, x0, x1, x1, ...]`.

    One log-softmax of the predictions serves both terms, and the gradient
    with respect to the logits `z` is the closed form

    ```
    d CE / dz = q * sum(y) - y            (q - onehot for sparse labels)
    d SKL / dz_even = q_e (u - E_e[u]) + (q_e - q_o),  u = log q_e - log q_o
    d SKL / dz_odd  = q_o (E_o[u] - u) - (q_e - q_o)
    ```

    the pair's term counting for both rows of the pair.

    Args:
        y_true: one-hot (or soft) labels like `y_pred`, or class indices
            `[batch]` / `[batch, 1]` with `sparse=True`. A sparse label
            outside `[0, classes)` (or NaN) gives NaN for its row.
        y_pred: logits (or probabilities) `[2 * pairs, ..., classes]`.
        alpha: weight of the consistency term (a number `>= 0`).
        from_logits: whether `y_pred` holds logits.
        sparse: whether the labels are class indices.
        precise: `None`, `True` or `False`: the path of the symmetric KL
            (see `keras_kd.ops.symmetric_kl_divergence`).

    Returns:
        The loss per row, `[2 * pairs, ...]`.
    """
    precise = resolve_precise(precise)
    y_pred = _as_float(y_pred)
    batch = y_pred.shape[0]
    if batch is not None and batch % 2:
        raise ValueError(
            "R-Drop needs a batch of interleaved pairs [x0, x0, x1, x1, ...]"
            f" and so an even batch size. Received: y_pred.shape="
            f"{tuple(y_pred.shape)}"
        )
    if not sparse:
        _check_same_shape(ops.convert_to_tensor(y_true), y_pred)
    labels = ops.cast(y_true, y_pred.dtype)
    if sparse and len(labels.shape) == len(y_pred.shape):
        labels = ops.squeeze(labels, axis=-1)
    # Probabilities become logits outside the closed form: autodiff takes
    # the gradient through the log.
    z = _logits_of(y_pred, from_logits)
    quarter = alpha / 4.0

    def forward(z, labels, eager):
        log_q = _log_softmax(z, -1)
        ce, ce_grad = _cross_entropy(labels, log_q, sparse)
        pair = lr.pair_of_logs(
            z[0::2], z[1::2], log_q[0::2], log_q[1::2], 1.0, -1, precise
        )
        pair_value, pair_grads = symmetric_kl_terms(pair)
        pair_value = ops.squeeze(pair_value, axis=-1)
        value = ce + quarter * ops.repeat(pair_value, 2, axis=0)

        def grads(upstream):
            up = ops.expand_dims(upstream, -1)
            both = up[0::2] + up[1::2]  # the pair's term is on both rows
            odd_grad, even_grad = pair_grads()
            paired = ops.stack([even_grad * both, odd_grad * both], axis=1)
            paired = ops.reshape(paired, ops.shape(log_q))
            return (ce_grad() * up + quarter * paired,)

        return value, grads

    def reference(z, labels):
        log_q = _log_softmax(z, -1)
        ce, _ = _cross_entropy(labels, log_q, sparse)
        p, q = ops.exp(log_q[0::2]), ops.exp(log_q[1::2])
        pair = ops.sum((p - q) * (log_q[0::2] - log_q[1::2]), axis=-1)
        return ce + quarter * ops.repeat(pair, 2, axis=0)

    return with_gradient(forward, reference, (z,), (labels,))


def _cross_entropy(labels, log_q, sparse):
    """`-log q[label]` (sparse) or `-sum(y * log q)` from finite logs, and
    a function returning its gradient with respect to the logits.

    A sparse label outside `[0, classes)` (or NaN) gives NaN for its row
    (gradient 0 there): gathering it would read another class (-1 is the
    last one on some backends) or fail on others.
    """
    if not sparse:
        # log q is finite (see `keras_kd.ops._core._log_softmax`): a zero
        # label times a class without mass is exactly 0, and a NaN label
        # reaches the value.
        value = -ops.sum(labels * log_q, axis=-1)

        def dense_grad():
            total = ops.sum(labels, axis=-1, keepdims=True)
            return ops.exp(log_q) * total - labels

        return value, dense_grad
    classes = log_q.shape[-1]
    valid = ops.logical_and(labels >= 0, labels < classes)
    index = ops.cast(ops.where(valid, labels, 0), "int32")
    picked = ops.take_along_axis(log_q, ops.expand_dims(index, -1), axis=-1)
    value = ops.where(valid, -ops.squeeze(picked, axis=-1), math.nan)

    def sparse_grad():
        onehot = ops.one_hot(index, classes, dtype=log_q.dtype)
        return ops.where(
            ops.expand_dims(valid, -1), ops.exp(log_q) - onehot, 0.0
        )

    return value, sparse_grad
