"""Argument checks and backend glue shared by the Distiller family."""

import contextlib
import math

import keras
from keras import ops

try:
    # Keras' monitoring callbacks (EarlyStopping, ReduceLROnPlateau, ...)
    # infer `mode="auto"` only for metrics held in this container, so the
    # loss-term trackers live in one; without it they need `mode="min"`.
    from keras.src.trainers.compile_utils import MetricsList as _Container
except ImportError:  # pragma: no cover - depends on the Keras version
    _Container = keras.metrics.Metric


class LossTerms(_Container):
    """The `student_loss` / `distillation_loss` trackers as one metric."""

    def __init__(self, trackers, name="distillation_loss_terms"):
        keras.metrics.Metric.__init__(self, name=name)
        self.metrics = trackers
        self.output_name = None

    def update_state(self, *args, **kwargs):
        raise NotImplementedError(
            "The loss-term trackers are updated by `Distiller.compute_loss`."
        )

    def reset_state(self):
        for metric in self.metrics:
            metric.reset_state()

    def result(self):
        return {metric.name: metric.result() for metric in self.metrics}


def validate_model(name, model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a `keras.Model`. "
            f"Received: {name}={model!r} of type {type(model).__name__}"
        )


def validate_alpha(alpha):
    """Returns `alpha` as a float, or raises a `ValueError`."""
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not (math.isfinite(alpha) and 0.0 <= alpha <= 1.0)
    ):
        raise ValueError(
            "Invalid value for argument `alpha`. Expected a number in "
            f"[0, 1]. Received: alpha={alpha!r}"
        )
    return float(alpha)


def validate_temperature(temperature):
    """Returns `temperature` as a float, or raises a `ValueError`."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(
            "Invalid value for argument `temperature`. Expected a finite "
            f"number > 0. Received: temperature={temperature!r}"
        )
    return float(temperature)


def validate_distillation_loss(loss):
    if not isinstance(loss, keras.losses.Loss):
        raise ValueError(
            "Invalid value for argument `distillation_loss`. Expected a "
            "`keras.losses.Loss` instance, e.g. "
            "`keras_kd.losses.KLDivergence(temperature=4.0)` (a function "
            "`f(y_true, y_pred)` can be wrapped in "
            "`keras.losses.LossFunctionWrapper(f)`). "
            f"Received: distillation_loss={loss!r}"
        )


def _shapes(structure):
    return keras.tree.map_structure(lambda t: tuple(t.shape), structure)


def check_matching_outputs(teacher_outputs, student_outputs):
    """Raises a `ValueError` unless the two output structures have the same
    nesting and compatible shapes (`None` matches any size)."""
    try:
        keras.tree.assert_same_structure(teacher_outputs, student_outputs)
        pairs = zip(
            keras.tree.flatten(teacher_outputs),
            keras.tree.flatten(student_outputs),
        )
        same = all(_compatible(t.shape, s.shape) for t, s in pairs)
    except (ValueError, TypeError):
        same = False
    if not same:
        raise ValueError(
            "Invalid value for argument `teacher`. Expected teacher outputs "
            "with the same structure and shape as the student's outputs "
            f"{_shapes(student_outputs)}. Received: teacher output shape "
            f"{_shapes(teacher_outputs)}"
        )


def _compatible(a, b):
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def inference_only():
    """A context in which no autograd graph is recorded.

    Only PyTorch records one eagerly for every operation on weights that
    require a gradient; the other backends differentiate only what the loss
    asks for, so they need nothing here.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def unscale_for_replicas(value):
    """Undoes the `1 / replicas` factor Keras losses carry under a
    `tf.distribute` strategy, so trackers record the per-batch mean."""
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * ops.cast(replicas, value.dtype)
    return value
