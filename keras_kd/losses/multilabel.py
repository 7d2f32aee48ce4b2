"""Losses for multi-label (GlobalPointer) logits."""

from keras import ops

from keras_kd import ops as kd_ops
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss


@export
class GlobalPointerKLDivergence(DivergenceLoss):
    """Symmetric sigmoid "KL" of GlobalPointer (multi-label) logits.

    Formula:

    ```
    loss = T**2 * sum((sigmoid(s/T) - sigmoid(t/T)) * (s/T - t/T))
    ```

    summed over one label set: the `length x length` span grid of one
    (example, head) for `[batch, heads, length, length]` logits, the last
    axis otherwise. The default reduction then averages over examples and
    heads. Masked entries (`-inf`, or large negatives in both inputs)
    contribute exactly 0.

    Every entry is non-negative. The precise path (the default on JAX and
    TensorFlow) is exact to a relative 1e-5 also for nearly equal logits
    and at `T = 1000`; the gradient is a closed form.

    Args:
        temperature: softening temperature `T > 0`.
        axis: the axes of one label set; `None` for the rule above.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False` (see `keras_kd.ops`).
    """

    fn = staticmethod(kd_ops.global_pointer_kl_divergence)
    _fn_args = ("temperature", "axis", "precise")

    def __init__(
        self,
        temperature=1.0,
        axis=None,
        reduction="sum_over_batch_size",
        name="global_pointer_kl_divergence",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            temperature=temperature,
            axis=axis,
            precise=precise,
        )


@export
class MultilabelCategoricalCrossentropy(DivergenceLoss):
    """Multi-label categorical crossentropy, the GlobalPointer training loss.

    Formula:

    ```
    loss = log(1 + sum_{neg} exp(s_i)) + log(1 + sum_{pos} exp(-s_j))
    ```

    `y_true` holds 0/1 labels, `y_pred` logits. One label set is the span
    grid of one (example, head) for rank-4 inputs, the last axis otherwise;
    entries whose logit is `-inf` are left out.

    Args:
        axis: the axes of one label set; `None` for the rule above.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
    """

    fn = staticmethod(kd_ops.multilabel_categorical_crossentropy)
    _fn_args = ("axis",)

    def __init__(
        self,
        axis=None,
        reduction="sum_over_batch_size",
        name="multilabel_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(reduction, name, dtype, axis=axis)


def _sparse_mlce(y_true, y_pred, mask_zero):
    # GlobalPointer logits [batch, heads, length, length] are flattened to
    # [batch, heads, length**2] to match flat span indices.
    if len(y_pred.shape) == 4:
        shape = ops.shape(y_pred)
        y_pred = ops.reshape(y_pred, (shape[0], shape[1], -1))
    return kd_ops.sparse_multilabel_categorical_crossentropy(
        y_true, y_pred, mask_zero=mask_zero
    )


@export
class SparseMultilabelCategoricalCrossentropy(DivergenceLoss):
    """Multi-label categorical crossentropy with positives given as indices.

    `y_true` is an int tensor `[..., max_positives]` of flat indices (for a
    GlobalPointer span `(start, end)`: `start * length + end`), padded with
    `-1` (or `0` with `mask_zero=True`). Same value as
    `MultilabelCategoricalCrossentropy`; the labels take memory linear in
    the number of entities.

    Args:
        mask_zero: whether index 0 is padding.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
    """

    fn = staticmethod(_sparse_mlce)
    _fn_args = ("mask_zero",)

    def __init__(
        self,
        mask_zero=False,
        reduction="sum_over_batch_size",
        name="sparse_multilabel_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(reduction, name, dtype, mask_zero=mask_zero)
