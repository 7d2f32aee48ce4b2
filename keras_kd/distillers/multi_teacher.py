"""`MultiTeacherDistiller`: one student, several frozen teachers."""

import math

import keras
from keras import ops

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd._model_utils import check_pairs, frozen_call, own_copy
from keras_kd.api import export
from keras_kd.distillers.distiller import Distiller

COMBINE = ("probabilities", "losses")


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
        super().__init__(student, None, **kwargs)
        if not isinstance(teachers, (list, tuple)) or not teachers:
            raise _checks.invalid(
                "teachers", "a non-empty list of `keras.Model`s", teachers
            )
        self._add_teachers("teachers", list(teachers))
        self.teachers = list(teachers)
        given = [1.0] * len(teachers) if weights is None else weights
        self.teacher_weights = _checks.weights("weights", given, len(teachers))
        self.weights_given = (
            None
            if weights is None
            else [_checks.as_python_number(w) for w in weights]
        )
        self.combine = _checks.choice("combine", combine, COMBINE)

    def teacher_predictions(self, x):
        """The list of the teachers' outputs, each gradient-free."""
        return [frozen_call(teacher, x) for teacher in self.teachers]

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
        for outputs in teacher_pred:
            check_pairs(outputs, y_pred)
        if self.combine == "probabilities":
            mixture = keras.tree.map_structure(
                lambda *leaves: self._mixture(leaves), *teacher_pred
            )
            return super().compute_distillation_loss(
                x, y, y_pred, mixture, sample_weight
            )
        total = None
        for outputs, w in zip(teacher_pred, self.teacher_weights):
            value = w * super().compute_distillation_loss(
                x, y, y_pred, outputs, own_copy(sample_weight)
            )
            total = value if total is None else total + value
        return total

    def get_config(self):
        config = super().get_config()
        config.update(
            teachers=[
                keras.saving.serialize_keras_object(t) for t in self.teachers
            ],
            weights=self.weights_given,
            combine=self.combine,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["teachers"] = [
            keras.saving.deserialize_keras_object(
                t, custom_objects=custom_objects
            )
            for t in config["teachers"]
        ]
        return super().from_config(config, custom_objects=custom_objects)
