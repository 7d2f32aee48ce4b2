"""The `Distiller`'s fused path for Hinton's loss.

When the student's compiled loss is a `SparseCategoricalCrossentropy` on
logits and the distillation loss keras-kd's `KLDivergence`, the two terms
come from `ops.sparse_crossentropy_and_kl_divergence`: one forward
computation and one combined gradient expression, instead of two losses
with two backward passes whose gradients are then added. The
values are those of the two losses (each term keeps its own Keras
reduction and sample weighting); any case this path does not cover falls
back to the two losses, unchanged. On torch the two losses are faster, and
the path is off.
"""

import keras
from keras import ops

from keras_kd import losses as kd_losses
from keras_kd import ops as kd_ops
from keras_kd._keras_compat import keras_mask, loss_function_arguments
from keras_kd.losses.base import DivergenceLoss


class _Computed(DivergenceLoss):
    """Per-row values already computed, reduced the way the loss they
    stand for reduces its own (sample weights, reduction, dtype and the
    empty batch)."""

    def __init__(self, like):
        super().__init__(
            reduction=like.reduction, name=like.name, dtype=like.dtype
        )

    def call(self, y_true, y_pred):
        del y_true
        return y_pred


class Plan:
    """What `terms` needs, fixed at `compile` time."""

    def __init__(self, student_loss, distillation_loss):
        self.student = _Computed(student_loss)
        self.distillation = _Computed(distillation_loss)
        self.dtype = distillation_loss.dtype
        self.temperature = distillation_loss.temperature
        self.precise = distillation_loss.precise


def plan(model, base, loss, loss_weights):
    """A `Plan` when `model` (a subclass of the `Distiller` `base`, just
    compiled with `loss` and `loss_weights`) computes its two terms the
    base class's way and they can be computed together, else `None`."""
    if keras.backend.backend() == "torch":
        # Eager torch runs every op as its own pass, and its
        # `cross_entropy` kernel is leaner than any composition of ops:
        # the fused op measured 1.4x the two losses' step there
        # (BENCHMARKS.md, "Distiller step").
        return None
    cls = type(model)
    if (
        cls.compute_student_loss is not base.compute_student_loss
        or cls.compute_distillation_loss is not base.compute_distillation_loss
    ):
        return None
    distillation_loss = model.distillation_loss
    if loss_weights is not None or not (
        isinstance(distillation_loss, kd_losses.DivergenceLoss)
        and distillation_loss.divergence == "kl"
    ):
        return None
    if not isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return None
    arguments = loss_function_arguments(loss)
    fusable = (
        arguments.get("from_logits") is True
        and arguments.get("ignore_class") is None
        and arguments.get("axis", -1) == -1
        and distillation_loss.from_logits
        and distillation_loss.axis == -1
        and loss.dtype == distillation_loss.dtype
    )
    return Plan(loss, distillation_loss) if fusable else None


def terms(plan, y, y_pred, teacher_pred, sample_weight):
    """`(student_loss, distillation_loss)` for one batch, or `None` where
    the batch is not the plain case (nested outputs or weights, a Keras
    mask, shapes the two losses would reject or reshape): the caller then
    computes the two losses separately, errors included."""
    if not plan or y is None:
        return None
    flat = [y, y_pred, teacher_pred]
    if any(keras.tree.is_nested(v) for v in flat) or isinstance(
        sample_weight, (list, tuple, dict)
    ):
        return None
    if keras_mask(y_pred) is not None or keras_mask(teacher_pred) is not None:
        return None
    shape = tuple(y_pred.shape)
    if len(shape) < 2 or tuple(teacher_pred.shape) != shape or 0 in shape:
        return None
    labels = ops.convert_to_tensor(y)
    if tuple(labels.shape) == shape[:-1] + (1,):
        labels = ops.squeeze(labels, axis=-1)
    if tuple(labels.shape) != shape[:-1]:
        return None
    student_rows, distillation_rows = (
        kd_ops.sparse_crossentropy_and_kl_divergence(
            labels,
            ops.cast(teacher_pred, plan.dtype),
            ops.cast(y_pred, plan.dtype),
            temperature=plan.temperature,
            precise=plan.precise,
        )
    )
    student = plan.student(student_rows, student_rows, sample_weight)
    distillation = plan.distillation(
        distillation_rows, distillation_rows, sample_weight
    )
    return student, distillation
