"""`MultiTeacherDistiller`: one student, several frozen teachers."""

import math
import numbers

import keras
from keras import ops

from keras_kd import ops as kd_ops
from keras_kd._distiller_utils import check_pairs as check_matching_outputs
from keras_kd._checks import model as _model


def validate_model(name, model):
    _model(name, model)
from keras_kd.api import export
from keras_kd.distiller import Distiller

COMBINE = ("probabilities", "losses")


class _Teachers(keras.Model):
    """The teachers as one model (so the `Distiller` freezes them all):
    `call` returns the list of their outputs."""

    def __init__(self, teachers, **kwargs):
        super().__init__(**kwargs)
        self.teachers = list(teachers)
        self.built = True

    @property
    def outputs(self):
        # The Distiller compares `teacher.outputs` with the student's; the
        # ensemble's are checked teacher by teacher instead.
        return None

    def call(self, inputs, training=False):
        return [t(inputs, training=training) for t in self.teachers]


def _validate_teachers(student, teachers):
    if not isinstance(teachers, (list, tuple)) or not teachers:
        raise ValueError(
            "Invalid value for argument `teachers`. Expected a non-empty "
            f"list of `keras.Model`s. Received: teachers={teachers!r}"
        )
    for i, teacher in enumerate(teachers):
        validate_model(f"teachers[{i}]", teacher)
        if teacher is student or not teacher.built:
            raise ValueError(
                f"Invalid value for argument `teachers[{i}]`. Expected a "
                "built model other than the student. Received: "
                f"teachers[{i}]={teacher.name}"
            )
        if getattr(student, "outputs", None) and teacher.outputs:
            check_matching_outputs(teacher.outputs, student.outputs)
    if len({id(t) for t in teachers}) != len(teachers):
        raise ValueError(
            "Invalid value for argument `teachers`. Expected distinct "
            "models; give a repeated teacher a larger weight instead. "
            f"Received: teachers={[t.name for t in teachers]}"
        )


def _normalized_weights(weights, count):
    if weights is None:
        return [1.0 / count] * count
    ok = isinstance(weights, (list, tuple)) and len(weights) == count
    ok = ok and all(
        isinstance(w, numbers.Real)
        and not isinstance(w, bool)
        and math.isfinite(w)
        and w >= 0
        for w in weights
    )
    if not ok or sum(weights) <= 0:
        raise ValueError(
            "Invalid value for argument `weights`. Expected one finite "
            f"number >= 0 per teacher ({count}), not all 0. Received: "
            f"weights={weights!r}"
        )
    total = float(sum(weights))
    return [float(w) / total for w in weights]


@export
class MultiTeacherDistiller(Distiller):
    """A `Distiller` with several frozen teachers, combined by weight.

    The weights are normalized to sum to 1. Two ways to combine:

    - `combine="probabilities"` (default): the student learns the weighted
      mixture of the teachers' distributions at the distillation
      temperature `T`, `P = sum_i w_i softmax(t_i / T)`, formed in log
      space (`logsumexp_i(log w_i + log_softmax(t_i / T))`) and handed to
      the distillation loss as the logits `T * log P`, whose softmax at
      `T` is exactly `P`. One loss evaluation; any divergence applies.
    - `combine="losses"`: the weighted mean of the per-teacher losses,
      `sum_i w_i * distillation_loss(t_i, student)`.

    For the forward KL divergence the two give the same gradient with
    respect to the student (`KL(P || Q)` is linear in `P` up to the
    entropy of `P`, which does not involve the student); their values
    differ by a constant, the weighted Jensen-Shannon divergence of the
    teachers `sum_i w_i KL(P_i || P) >= 0`. For other divergences
    (reverse KL, JSD) the two are different objectives.

    Every teacher runs once per step in inference mode without gradient,
    and all are left out of the trainable weights. Each teacher's outputs
    must match the student's.

    Args:
        student: the `keras.Model` to train.
        teachers: a list of built `keras.Model`s.
        weights: one number `>= 0` per teacher (default: equal).
        combine: `"probabilities"` or `"losses"`.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    distiller = keras_kd.MultiTeacherDistiller(
        student, [teacher_a, teacher_b], weights=[2.0, 1.0]
    )
    distiller.compile(
        "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=4.0),
    )
    ```
    """

    def __init__(
        self, student, teachers, weights=None, combine="probabilities", **kwargs
    ):
        validate_model("student", student)
        _validate_teachers(student, teachers)
        if combine not in COMBINE:
            raise ValueError(
                "Invalid value for argument `combine`. Expected one of "
                f"{COMBINE}. Received: combine={combine!r}"
            )
        super().__init__(
            student, _Teachers(teachers, name="teachers"), **kwargs
        )
        self.weights_given = None if weights is None else list(weights)
        self.teacher_weights = _normalized_weights(weights, len(teachers))
        self.combine = combine

    @property
    def teachers(self):
        return list(self.teacher.teachers)

    def teacher_predictions(self, x):
        """Per-teacher outputs (`combine="losses"`) or the mixture as
        logits at the loss's temperature (`combine="probabilities"`)."""
        outputs = super().teacher_predictions(x)
        if self.combine == "losses":
            return outputs
        return keras.tree.map_structure(
            lambda *leaves: self._mixture(leaves), *outputs
        )

    def _mixture(self, leaves):
        loss = self.distillation_loss
        from_logits = getattr(loss, "from_logits", True)
        bound = getattr(loss, "temperature", None) is self.temperature
        temperature = self.temperature if bound else 1.0
        terms = [
            kd_ops.log_probabilities(leaf, from_logits, temperature)
            + math.log(w)
            for leaf, w in zip(leaves, self.teacher_weights)
            if w > 0
        ]
        log_mix = ops.logsumexp(ops.stack(terms, axis=0), axis=0)
        scaled = log_mix * ops.cast(temperature, log_mix.dtype)
        return scaled if from_logits else ops.exp(scaled)

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        if self.combine == "probabilities":
            return super().compute_distillation_loss(
                x, y, y_pred, teacher_pred, sample_weight
            )
        total = None
        for outputs, w in zip(teacher_pred, self.teacher_weights):
            value = w * super().compute_distillation_loss(
                x, y, y_pred, outputs, sample_weight
            )
            total = value if total is None else total + value
        return total

    def get_config(self):
        # Distiller.get_config would serialize the `_Teachers` wrapper.
        return dict(
            name=self.name,
            trainable=self.trainable,
            student=keras.saving.serialize_keras_object(self.student),
            teachers=[
                keras.saving.serialize_keras_object(t) for t in self.teachers
            ],
            weights=self.weights_given,
            combine=self.combine,
        )

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["student"] = keras.saving.deserialize_keras_object(
            config["student"], custom_objects=custom_objects
        )
        config["teachers"] = [
            keras.saving.deserialize_keras_object(
                t, custom_objects=custom_objects
            )
            for t in config["teachers"]
        ]
        return cls(**config)
