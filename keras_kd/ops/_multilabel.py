"""Multi-label losses: the multi-label categorical crossentropy, dense and
sparse (the GlobalPointer training loss), with its closed-form gradient.
The GlobalPointer divergence is in `_global_pointer.py`."""

import math

import keras
from keras import ops

from keras_kd.ops._core import _as_float, _pair, _reduce_max
from keras_kd.ops._global_pointer import (
    binary_symmetric_kl_divergence as binary_symmetric_kl_divergence,
)
from keras_kd.ops._global_pointer import (
    global_pointer_kl_divergence as global_pointer_kl_divergence,
)
from keras_kd.ops._gradients import with_gradient
from keras_kd.ops._softmax_terms import _expand


def _label_axes(x, axis):
    if axis is not None:
        return axis
    return (-2, -1) if len(x.shape) == 4 else -1


def multilabel_categorical_crossentropy(y_true, y_pred, axis=None):
    """Multi-label categorical crossentropy of logits against 0/1 labels.

    The "softmax + cross-entropy" generalized to any number of positives,
    the training loss of GlobalPointer heads:

    ```
    loss = log(1 + sum_{neg} exp(s_i)) + log(1 + sum_{pos} exp(-s_j))
    ```

    Each positive is pushed above 0 and each negative below 0. Entries whose
    logit is `-inf` (masked) contribute nothing, whatever their label. A NaN
    logit or a NaN label of an unmasked entry gives NaN for its label set.
    The gradient with respect to the logits is the closed form
    `softmax` over `[0, negatives]` minus that over `[0, -positives]`
    (0 on masked entries); the labels get none.

    Args:
        y_true: 0/1 labels, same shape as `y_pred`.
        y_pred: logits.
        axis: the axes of one label set, summed over. `None` means `(-2, -1)`
            (the `length x length` span grid) for rank-4 GlobalPointer
            logits and the last axis otherwise.

    Returns:
        The loss with `axis` removed: `[batch, heads]` for GlobalPointer
        logits, `[batch]` for `[batch, classes]`.

    Reference:
        Su. 将"Softmax+交叉熵"推广到多标签分类问题. 2020.
        https://spaces.ac.cn/archives/7359
    """
    y_true, y_pred = _pair(y_true, y_pred)
    axis = _label_axes(y_pred, axis)
    ndim = len(y_pred.shape)

    def forward(s, labels, eager):
        neg, pos = _signed_sets(labels, s)
        log_neg, log_pos = _log1p_sum_exp(neg, axis), _log1p_sum_exp(pos, axis)

        # d/ds log(1 + sum_neg e^s) = e^(s - log_neg) on the negatives,
        # d/ds log(1 + sum_pos e^-s) = -e^(-s - log_pos) on the positives;
        # excluded entries are -inf in `neg` / `pos`: exactly 0.
        def grads():
            down = ops.exp(neg - _expand(log_neg, axis, ndim))
            up = ops.exp(pos - _expand(log_pos, axis, ndim))
            return (down - up,)

        if eager:
            computed = grads()
            grads = lambda: computed  # noqa: E731

        def scaled(upstream):
            return (grads()[0] * _expand(upstream, axis, ndim),)

        return log_neg + log_pos, scaled

    def reference(s, labels):
        neg, pos = _signed_sets(labels, s)
        return _log1p_sum_exp(neg, axis) + _log1p_sum_exp(pos, axis)

    return with_gradient(forward, reference, (y_pred,), (y_true,))


def _signed_sets(labels, s):
    """The negatives' logits and the positives' negated logits, `-inf`
    elsewhere."""
    positive = labels > 0.5
    # `== -inf`, not `> -inf`: a NaN logit must stay in the sums.
    masked = s == -math.inf
    # A NaN label is neither positive nor negative: it poisons the set.
    logits = ops.where(ops.isnan(labels), math.nan, s)
    # A masked entry is excluded from both sums, whatever its label.
    neg = ops.where(ops.logical_or(masked, positive), -math.inf, logits)
    pos = ops.where(
        ops.logical_and(ops.logical_not(masked), positive), -logits, -math.inf
    )
    return neg, pos


def _log1p_sum_exp(x, axis):
    """`log(1 + sum(exp(x)))` over `axis`, stable, `-inf` entries ignored."""
    if isinstance(axis, int):
        axis = (axis,)
    top = _reduce_max(x, axis)
    # Shift by max(top, 0) so that no exp() overflows; a set with no finite
    # entry (all masked) shifts by 0, and so does a NaN set, whose sum is
    # NaN anyway. The shift is a constant: the value does not depend on it,
    # and its gradient must not either. (`where`, not `ops.maximum`, which
    # computes float64 in float32 on torch.)
    high = ops.stop_gradient(ops.where(top > 0, top, 0.0))
    total = ops.squeeze(
        ops.sum(ops.exp(x - high), axis=axis, keepdims=True), axis=axis
    )
    high = ops.squeeze(high, axis=axis)
    # Unshifted, log1p keeps the digits of a small sum (a well-trained
    # model's loss); shifted, the sum is >= 1 and log is exact.
    shifted = high + ops.log(total + ops.exp(-high))
    return ops.where(high > 0, shifted, ops.log1p(total))


def sparse_multilabel_categorical_crossentropy(y_true, y_pred, mask_zero=False):
    """Multi-label categorical crossentropy with sparse positive labels.

    Same value as `multilabel_categorical_crossentropy`, but the positives
    come as integer indices into the last axis instead of a dense 0/1
    tensor. For GlobalPointer spans the labels then take memory linear in
    the number of entities instead of `length**2` per head, which is what
    matters for a data pipeline. Inside the loss the positives are scattered
    into a boolean mask the size of the logits (no larger than the logits
    themselves), so the value is exact; the common shortcut
    `log(sum_all - sum_pos)` cancels catastrophically once the positives
    hold most of the mass, i.e. for a well-trained model.

    Args:
        y_true: int tensor `[..., num_positives]` of indices into the last
            axis of `y_pred` (for GlobalPointer, flatten the span grid:
            index `start * length + end`). Padding entries are `-1`, or `0`
            when `mask_zero=True` (then index 0 cannot be a positive).
            Repeated indices count once. A row holding any other value
            (an index `>= num_classes`, a negative index other than `-1`, a
            non-integer or NaN) gives NaN, never a finite wrong value.
        y_pred: logits `[..., num_classes]` (for GlobalPointer, reshape
            `[batch, heads, length, length]` to `[batch, heads, length**2]`).
        mask_zero: whether index 0 marks padding.

    Returns:
        The loss `[...]` (the class axis removed).
    """
    y_pred = _as_float(y_pred)
    positive = sparse_multilabel_mask(y_true, y_pred, mask_zero)
    value = multilabel_categorical_crossentropy(
        ops.cast(positive, y_pred.dtype), y_pred, axis=-1
    )
    valid = _sparse_rows_valid(y_true, y_pred.shape[-1], mask_zero)
    return ops.where(valid, value, math.nan)


def _sparse_rows_valid(indices, num_classes, mask_zero):
    """Whether each row of sparse labels holds only padding and indices in
    `[0, num_classes)`. Checked before any cast to int: a float label (a
    Keras `Loss` converts `y_true` to its dtype) that is NaN or not whole
    must not turn into some valid index."""
    indices = ops.convert_to_tensor(indices)
    padding = indices == -1
    if mask_zero:
        padding = ops.logical_or(padding, indices == 0)
    in_range = ops.logical_and(indices >= 0, indices < num_classes)
    if not keras.backend.is_int_dtype(indices.dtype):
        in_range = ops.logical_and(in_range, indices == ops.floor(indices))
    return ops.all(ops.logical_or(padding, in_range), axis=-1)


def sparse_multilabel_mask(y_true, y_pred, mask_zero=False):
    """The positive classes of sparse multi-label targets, as a boolean
    mask shaped like `y_pred`.

    The dense form of the labels `sparse_multilabel_categorical_crossentropy`
    takes; `keras_kd.metrics.SpanF1` counts spans with it.

    Args:
        y_true: int indices of the positive classes `[..., max_positives]`,
            padded with `-1` (or `0` with `mask_zero=True`). Indices outside
            `[0, classes)` mark nothing.
        y_pred: logits `[..., classes]` (only the shape is read); the last
            axis must have a static size.
        mask_zero: whether index 0 is padding rather than a class.

    Returns:
        A bool tensor shaped like `y_pred`, True at each row's positives.

    Example:

    >>> mask = keras_kd.ops.sparse_multilabel_mask([[2, 0, -1]], [[0.0] * 4])
    >>> keras.ops.convert_to_numpy(mask)
    array([[ True, False,  True, False]])
    """
    indices = ops.cast(ops.convert_to_tensor(y_true), "int32")
    logits = (
        y_pred if hasattr(y_pred, "shape") else ops.convert_to_tensor(y_pred)
    )
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError(
            "The last axis of `y_pred` must have a static size. Received: "
            f"y_pred.shape={tuple(logits.shape)}"
        )
    if tuple(indices.shape[:-1]) != tuple(logits.shape[:-1]) and None not in (
        tuple(indices.shape[:-1]) + tuple(logits.shape[:-1])
    ):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must agree on all axes but the "
            f"last. Received: y_true.shape={tuple(indices.shape)}, "
            f"y_pred.shape={tuple(logits.shape)}"
        )
    valid = ops.logical_and(
        indices > 0 if mask_zero else indices >= 0, indices < num_classes
    )
    # Padding goes to an extra column that is dropped afterwards, and so do
    # out-of-range indices, which some backends' scatter would reject
    # (`_sparse_rows_valid` flags their rows).
    columns = ops.where(valid, indices, num_classes)
    columns = ops.reshape(columns, (-1, indices.shape[-1]))
    rows = ops.shape(columns)[0]
    row_ids = ops.broadcast_to(
        ops.expand_dims(ops.arange(rows, dtype="int32"), -1),
        ops.shape(columns),
    )
    coordinates = ops.reshape(ops.stack([row_ids, columns], axis=-1), (-1, 2))
    counts = ops.scatter(
        coordinates,
        ops.ones((ops.shape(coordinates)[0],), dtype="int32"),
        (rows, num_classes + 1),
    )
    mask = counts[:, :num_classes] > 0
    return ops.reshape(mask, ops.shape(logits))
