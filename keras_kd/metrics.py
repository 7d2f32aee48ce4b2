"""Span-level precision, recall and F1 for GlobalPointer outputs."""

import math

import keras
from keras import ops

from keras_kd import ops as kd_ops
from keras_kd.api import export


class _SpanCounts(keras.metrics.Metric):
    """Counts true positives, false positives and false negatives of spans
    over all batches seen since the last `reset_state`."""

    def __init__(
        self,
        threshold=0.0,
        sparse=False,
        mask_zero=False,
        name=None,
        dtype=None,
    ):
        super().__init__(name=name, dtype=dtype)
        if isinstance(threshold, bool) or not isinstance(
            threshold, (int, float)
        ):
            raise ValueError(
                "Invalid value for argument `threshold`. Expected a number. "
                f"Received: threshold={threshold}"
            )
        self.threshold = float(threshold)
        self.sparse = bool(sparse)
        self.mask_zero = bool(mask_zero)
        self.true_positives = self._counter("true_positives")
        self.false_positives = self._counter("false_positives")
        self.false_negatives = self._counter("false_negatives")

    def _counter(self, name):
        return self.add_variable(
            shape=(), initializer="zeros", dtype="float32", name=name
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        """Adds the counts of one batch.

        Args:
            y_true: 0/1 labels shaped like `y_pred`, or with `sparse=True`
                int indices `[batch, heads, max_spans]` of the positive spans
                into the flattened `length x length` grid
                (`start * length + end`), padded with `-1` (`0` with
                `mask_zero=True`).
            y_pred: span logits, e.g. `[batch, heads, length, length]`.
                Entries equal to `-inf` (padding, `start > end`) are not
                candidates and are never counted, whatever their label.
            sample_weight: optional weight per example `[batch]` (or any
                shape that broadcasts against `y_pred` from the left).
        """
        y_pred = ops.convert_to_tensor(y_pred)
        if self.sparse:
            flat = y_pred
            if len(y_pred.shape) == 4:
                # The span grid flattened, as the sparse loss indexes it.
                flat = ops.reshape(y_pred, (*ops.shape(y_pred)[:2], -1))
            actual = ops.reshape(
                kd_ops.sparse_multilabel_mask(y_true, flat, self.mask_zero),
                ops.shape(y_pred),
            )
        else:
            actual = ops.convert_to_tensor(y_true) > 0.5
        candidate = y_pred > -math.inf
        predicted = ops.logical_and(y_pred > self.threshold, candidate)
        actual = ops.logical_and(actual, candidate)
        weight = None
        if sample_weight is not None:
            weight = ops.cast(sample_weight, "float32")
            while len(weight.shape) < len(y_pred.shape):
                weight = ops.expand_dims(weight, -1)

        def count(condition):
            condition = ops.cast(condition, "float32")
            if weight is not None:
                condition = condition * weight
            return ops.sum(condition)

        self.true_positives.assign_add(
            count(ops.logical_and(predicted, actual))
        )
        self.false_positives.assign_add(
            count(ops.logical_and(predicted, ops.logical_not(actual)))
        )
        self.false_negatives.assign_add(
            count(ops.logical_and(ops.logical_not(predicted), actual))
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "threshold": self.threshold,
                "sparse": self.sparse,
                "mask_zero": self.mask_zero,
            }
        )
        return config


@export
class SpanF1(_SpanCounts):
    """Span-level F1 of GlobalPointer logits, exact across batches.

    A span `(type, start, end)` is predicted when its logit is
    `> threshold`; it is correct when its label is 1. True positives (TP),
    false positives (FP) and false negatives (FN) are summed over every
    batch since the last `reset_state`, so the result is the F1 of the
    whole epoch, not an average of per-batch F1 values.

    Formula:

    ```
    f1 = 2 TP / (2 TP + FP + FN)    (0 when there is nothing to count)
    ```

    Args:
        threshold: logit threshold, `0.0` (a positive logit is a span).
        sparse: whether labels are positive span indices (as for
            `SparseMultilabelCategoricalCrossentropy`) instead of 0/1.
        mask_zero: with `sparse=True`, whether index 0 is padding.
        name: the metric name, `"span_f1"`.
        dtype: the dtype of the result.

    Example:

    ```python
    model.compile(
        optimizer="adam",
        loss=keras_kd.losses.MultilabelCategoricalCrossentropy(),
        metrics=[keras_kd.metrics.SpanF1()],
    )
    ```
    """

    def __init__(
        self,
        threshold=0.0,
        sparse=False,
        mask_zero=False,
        name="span_f1",
        dtype=None,
    ):
        super().__init__(threshold, sparse, mask_zero, name, dtype)

    def result(self):
        tp = self.true_positives
        return ops.divide_no_nan(
            2.0 * tp, 2.0 * tp + self.false_positives + self.false_negatives
        )


@export
class SpanPrecision(_SpanCounts):
    """Span-level precision `TP / (TP + FP)`; arguments as `SpanF1`."""

    def __init__(
        self,
        threshold=0.0,
        sparse=False,
        mask_zero=False,
        name="span_precision",
        dtype=None,
    ):
        super().__init__(threshold, sparse, mask_zero, name, dtype)

    def result(self):
        tp = self.true_positives
        return ops.divide_no_nan(tp, tp + self.false_positives)


@export
class SpanRecall(_SpanCounts):
    """Span-level recall `TP / (TP + FN)`; arguments as `SpanF1`."""

    def __init__(
        self,
        threshold=0.0,
        sparse=False,
        mask_zero=False,
        name="span_recall",
        dtype=None,
    ):
        super().__init__(threshold, sparse, mask_zero, name, dtype)

    def result(self):
        tp = self.true_positives
        return ops.divide_no_nan(tp, tp + self.false_negatives)
