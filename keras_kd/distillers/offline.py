"""Offline distillation: the teacher's outputs are computed once, stored,
and read back with each batch, so training runs no teacher forward pass."""

import math

from keras import ops

from keras_kd._model_utils import inputs_for
from keras_kd.api import export
from keras_kd.distillers.distiller import Distiller
from keras_kd.distillers.teacher_cache import (
    INPUTS,
    TEACHER_LOGITS,
    TOP_K_INDICES,
    TOP_K_VALUES,
)


def dense_from_top_k(values, indices, classes):
    """Logits `[..., classes]`: `values` at `indices`, `-inf` elsewhere.

    Args:
        values: `[..., k]` logits.
        indices: `[..., k]` class indices (distinct within a row).
        classes: the vocabulary size.

    Returns:
        `[..., classes]` float32 logits.
    """
    values = ops.cast(values, "float32")
    indices = ops.cast(indices, "int32")
    shape = ops.shape(values)
    k = shape[-1]
    values = ops.reshape(values, (-1, k))
    rows = ops.shape(values)[0]
    row_ids = ops.repeat(ops.arange(rows, dtype="int32"), k)
    coords = ops.stack([row_ids, ops.reshape(indices, (-1,))], axis=1)
    dense = ops.full((rows, classes), -math.inf, dtype="float32")
    dense = ops.scatter_update(dense, coords, ops.reshape(values, (-1,)))
    return ops.reshape(dense, tuple(shape[:-1]) + (classes,))


@export
class OfflineDistiller(Distiller):
    """A `Distiller` trained against cached teacher outputs.

    Same `compile` / `fit` API and loss as `Distiller`, but the teacher's
    outputs come with the data (see `cache_teacher_outputs`) instead of
    from a teacher forward pass: `x` is a dict with the student's inputs
    under `"inputs"` and the cache's arrays beside them (`fit` and
    `evaluate`); `predict` also takes plain inputs. The student must have
    a single output.

    With a top-k cache the teacher's distribution is its top-k classes,
    renormalized (see `cache_teacher_outputs` for the exact error).

    No teacher model is needed (or held) at training time.

    Args:
        student: the `keras.Model` to train.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    cache = keras_kd.cache_teacher_outputs(teacher, x_train)
    distiller = keras_kd.OfflineDistiller(student)
    distiller.compile(
        "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=4.0),
        alpha=0.1,
    )
    distiller.fit({"inputs": x_train, **cache}, y_train, epochs=10)
    ```
    """

    def __init__(self, student, **kwargs):
        super().__init__(student, None, **kwargs)

    def student_inputs(self, x):
        """The student's inputs: `x["inputs"]`, or `x` itself (`predict`
        on plain inputs)."""
        if isinstance(x, dict) and INPUTS in x:
            x = x[INPUTS]
        return inputs_for(self.student, x)

    def teacher_predictions(self, x):
        """Reads the cached teacher outputs from the batch `x`: the logits,
        or the pair `(values, indices)` of a top-k cache."""
        packed = isinstance(x, dict) and INPUTS in x
        if packed and TEACHER_LOGITS in x:
            logits = ops.cast(x[TEACHER_LOGITS], "float32")
            return ops.stop_gradient(logits)
        if packed and TOP_K_VALUES in x and TOP_K_INDICES in x:
            return (
                ops.stop_gradient(ops.cast(x[TOP_K_VALUES], "float32")),
                x[TOP_K_INDICES],
            )
        keys = sorted(x) if isinstance(x, dict) else type(x).__name__
        raise ValueError(
            "Invalid value for argument `x`. `OfflineDistiller` expects a "
            f"dict with the student's inputs under {INPUTS!r} and the "
            f"cached teacher outputs ({TEACHER_LOGITS!r}, or "
            f"{TOP_K_VALUES!r} and {TOP_K_INDICES!r}), e.g. "
            "`{'inputs': x, **keras_kd.cache_teacher_outputs(teacher, x)}`. "
            f"Received: x with {keys}"
        )

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        if isinstance(teacher_pred, tuple):
            values, indices = teacher_pred
            teacher_pred = dense_from_top_k(values, indices, y_pred.shape[-1])
        return super().compute_distillation_loss(
            x, y, y_pred, teacher_pred, sample_weight
        )
