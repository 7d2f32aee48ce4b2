"""R-Drop losses for a batch laid out as interleaved pairs."""

from keras_kd import _checks
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss
from keras_kd.ops._rdrop import rdrop_cross_entropy as rdrop_cross_entropy


def validate_alpha(alpha):
    """Returns `alpha` as a float `>= 0`, or raises a `ValueError`."""
    return _checks.non_negative("alpha", alpha)


class _RDropLoss(DivergenceLoss):
    _fn_args = ("alpha", "from_logits", "precise")
    _sparse = False

    def __init__(self, alpha, from_logits, reduction, name, dtype, precise):
        super().__init__(
            reduction,
            name,
            dtype,
            alpha=validate_alpha(alpha),
            from_logits=from_logits,
            precise=precise,
        )

    def call(self, y_true, y_pred):
        return rdrop_cross_entropy(
            y_true,
            y_pred,
            self.alpha,
            self.from_logits,
            self._sparse,
            self.precise,
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
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`: the path of the symmetric KL (see
            `keras_kd.ops.symmetric_kl_divergence`). The gradient is a
            closed form (`keras_kd.ops._rdrop.rdrop_cross_entropy`).

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
        precise=None,
    ):
        super().__init__(alpha, from_logits, reduction, name, dtype, precise)


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
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`: the path of the symmetric KL (see
            `keras_kd.ops.symmetric_kl_divergence`). The gradient is a
            closed form (`keras_kd.ops._rdrop.rdrop_cross_entropy`).
    """

    _sparse = True

    def __init__(
        self,
        alpha=1.0,
        from_logits=False,
        reduction="sum_over_batch_size",
        name="rdrop_sparse_categorical_crossentropy",
        dtype=None,
        precise=None,
    ):
        super().__init__(alpha, from_logits, reduction, name, dtype, precise)
