"""R-Drop losses for a batch laid out as interleaved pairs."""

import math

from keras import ops

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss
from keras_kd.ops import _core, _divergences


def validate_alpha(alpha):
    """Returns `alpha` as a float `>= 0`, or raises a `ValueError`."""
    return _checks.non_negative("alpha", alpha)


def _hard_label_cross_entropy(y_true, log_q, sparse):
    """`-log q[label]` (sparse) or `-sum(y * log q)`, from finite logs.

    A sparse label outside `[0, classes)` (or NaN) gives NaN for its row:
    gathering it would read another class (-1 is the last one on some
    backends) or fail on others.
    """
    if not sparse:
        # log q is finite (see `keras_kd.ops._core._log_softmax`): a zero
        # label times a class without mass is exactly 0, and a NaN label
        # reaches the value.
        return -ops.sum(y_true * log_q, axis=-1)
    labels = y_true
    if len(labels.shape) == len(log_q.shape):
        labels = ops.squeeze(labels, axis=-1)
    valid = ops.logical_and(labels >= 0, labels < log_q.shape[-1])
    labels = ops.cast(ops.where(valid, labels, 0), "int32")
    picked = ops.take_along_axis(log_q, ops.expand_dims(labels, -1), axis=-1)
    return ops.where(valid, -ops.squeeze(picked, axis=-1), math.nan)


def rdrop_cross_entropy(y_true, y_pred, alpha, from_logits, sparse):
    """Per-row R-Drop loss: cross-entropy plus `alpha / 4` times the pair's
    symmetric KL (see `RDropCategoricalCrossentropy`)."""
    y_pred = _core._as_float(y_pred)
    if not sparse:
        kd_ops._check_same_shape(ops.convert_to_tensor(y_true), y_pred)
    # One log-softmax serves both terms.
    log_q = _core._finite_log_probabilities(y_pred, from_logits, 1.0, -1)
    ce = _hard_label_cross_entropy(ops.cast(y_true, log_q.dtype), log_q, sparse)
    pair = kd_ops.paired_symmetric_kl_divergence(
        log_q, divergence=_divergences._symmetric_kl_of_logs
    )
    return ce + (alpha / 4.0) * pair


class _RDropLoss(DivergenceLoss):
    _fn_args = ("alpha", "from_logits")
    _sparse = False

    def __init__(self, alpha, from_logits, reduction, name, dtype):
        super().__init__(
            reduction,
            name,
            dtype,
            alpha=validate_alpha(alpha),
            from_logits=from_logits,
        )

    def call(self, y_true, y_pred):
        return rdrop_cross_entropy(
            y_true, y_pred, self.alpha, self.from_logits, self._sparse
        )


@export
class RDropCategoricalCrossentropy(_RDropLoss):
    """Categorical crossentropy with the R-Drop consistency term.

    The batch must hold every example twice in a row,
    `[x0, x0, x1, x1, ...]`, with one-hot (or soft) labels for every row, so
    that dropout makes the two predictions of a pair differ. With `p` the
    predictions:

    Formula:

    ```
    loss = mean(CE(y, p))
           + alpha * mean(KL(p[::2] || p[1::2]) + KL(p[1::2] || p[::2])) / 4
    ```

    Per pair this is `(CE1 + CE2 + alpha / 2 * (KL12 + KL21)) / 2`, the
    paper's loss divided by the two rows of the pair. `keras_kd.RDrop` does
    the doubling inside the model so that no special data generator is
    needed.

    Args:
        alpha: weight of the consistency term, `>= 0`.
        from_logits: whether `y_pred` holds logits.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.

    Reference:
        Liang et al. R-Drop: Regularized Dropout for Neural Networks.
        NeurIPS 2021. https://arxiv.org/abs/2106.14448
    """

    def __init__(
        self,
        alpha=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="rdrop_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(alpha, from_logits, reduction, name, dtype)


@export
class RDropSparseCategoricalCrossentropy(_RDropLoss):
    """`RDropCategoricalCrossentropy` with integer labels.

    Labels are class indices `[batch]` (or `[batch, 1]`) for the interleaved
    batch `[x0, x0, x1, x1, ...]`. A label outside `[0, classes)` gives NaN
    for its row (never the value of another class).

    Args:
        alpha: weight of the consistency term, `>= 0`.
        from_logits: whether `y_pred` holds logits.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
    """

    _sparse = True

    def __init__(
        self,
        alpha=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="rdrop_sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(alpha, from_logits, reduction, name, dtype)
