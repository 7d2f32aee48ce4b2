"""The `Distiller`: train a student against a frozen teacher with `fit`."""

import keras
from keras import ops

from keras_kd import losses as kd_losses
from keras_kd._distiller_utils import (
    LossTerms,
    check_matching_outputs,
    inference_only,
    unscale_for_replicas,
    validate_alpha,
    validate_distillation_loss,
    validate_model,
)
from keras_kd._frozen_teacher import FrozenTeacher
from keras_kd.api import export


@export
class Distiller(FrozenTeacher, keras.Model):
    """A student model trained to match a frozen teacher, with `fit`.

    The Distiller is a `keras.Model` whose forward pass is the student's:
    `predict`, `evaluate` and compiled metrics all see the student's outputs.
    Training minimizes

    Formula:

    ```
    loss = alpha * student_loss(y, student(x))
           + (1 - alpha) * distillation_loss(teacher(x), student(x))
    ```

    plus the student's regularization losses. With `loss=None` in `compile`
    the first term is dropped and `loss = distillation_loss` (pure
    distillation, no labels needed). `sample_weight` and Keras masks on the
    student's output weight both terms.

    Per step the student runs once (Keras' own forward pass; `compute_loss`
    reuses its `y_pred`) and the teacher once, with `training=False`, its
    outputs behind `ops.stop_gradient` (and, on PyTorch, under
    `torch.no_grad()` so that no autograd graph is recorded for it).

    The teacher is frozen without being modified: the Distiller leaves the
    teacher's weights out of its own `trainable_weights` (they are listed in
    `non_trainable_weights`), so the optimizer never sees them, and always
    calls the teacher in inference mode, so its BatchNormalization statistics
    and dropout stay fixed. The caller's teacher object, including its
    `trainable` flag, is left as it was. Teacher and student must not share
    layers. The teacher's own regularization losses are constants of frozen
    weights and are left out of the total.

    `alpha` and the distillation temperature are scalar `keras.Variable`s
    owned by the Distiller (`distiller.alpha`, `distiller.temperature`), so a
    callback (`keras_kd.callbacks.AlphaScheduler`,
    `keras_kd.callbacks.TemperatureScheduler`) can change them between
    epochs inside compiled train functions on every backend. They are saved
    with the weights.

    History and logs carry `loss`, `student_loss` (only when `loss` is
    given), `distillation_loss` and every compiled metric, with `val_`
    variants.

    Extension points (override in a subclass):

    - `call(inputs, training)`: the student's forward pass on the part of
      `x` the student takes.
    - `teacher_predictions(x)`: the teacher's outputs for the batch `x`;
      replace it to read cached (offline) teacher outputs from `x`, or to
      combine several teachers.
    - `compute_distillation_loss(x, y, y_pred, teacher_pred, sample_weight)`:
      the distillation term as a scalar.
    - `compute_student_loss(x, y, y_pred, sample_weight)`: the hard-label
      term, or `None`.

    Args:
        student: the `keras.Model` to train.
        teacher: a built `keras.Model` whose outputs have the same structure
            and shapes as the student's.
        **kwargs: passed to `keras.Model` (e.g. `name`).

    Example:

    ```python
    distiller = keras_kd.Distiller(student=student, teacher=teacher)
    distiller.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=4.0),
        alpha=0.1,
        metrics=["sparse_categorical_accuracy"],
    )
    distiller.fit(x, y, validation_data=(x_val, y_val), epochs=10)
    distiller.student.save("student.keras")
    ```

    Reference:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network.
        2015. https://arxiv.org/abs/1503.02531
    """

    def __init__(self, student, teacher, **kwargs):
        super().__init__(**kwargs)
        validate_model("student", student)
        validate_model("teacher", teacher)
        if student is teacher:
            raise ValueError(
                "Invalid value for argument `teacher`. Expected a model "
                "other than the student. Received: the student itself"
            )
        if not teacher.built:
            raise ValueError(
                "Invalid value for argument `teacher`. Expected a built "
                "model (a trained teacher, or one given an `Input`). "
                f"Received: an unbuilt teacher={teacher.name}"
            )
        if getattr(student, "outputs", None) and teacher.outputs:
            check_matching_outputs(teacher.outputs, student.outputs)
        self.student = student
        self.teacher = teacher
        self.alpha = self._scalar_weight("alpha", 0.1)
        self.temperature = self._scalar_weight("temperature", 1.0)
        self._student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self._distillation_loss_tracker = keras.metrics.Mean(
            name="distillation_loss"
        )
        self._distillation_loss_tracker._direction = "down"
        self._student_loss_tracker._direction = "down"
        self._both_terms = LossTerms(
            [self._student_loss_tracker, self._distillation_loss_tracker]
        )
        self._distillation_term = LossTerms([self._distillation_loss_tracker])
        self._distillation_loss = None
        if student.built:
            self.built = True

    def _scalar_weight(self, name, value):
        return self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            autocast=False,
            name=name,
        )

    # ------------------------------------------------------------ forward

    def call(self, inputs, training=None):
        """Runs the student: `predict` returns the student's outputs."""
        return self.student(inputs, training=training)

    def teacher_predictions(self, x):
        """Returns the teacher's outputs for the batch `x`, gradient-free.

        The teacher runs in inference mode (`training=False`), so dropout is
        off and BatchNormalization uses and keeps its moving statistics.
        Override to supply teacher outputs another way (cached in `x`, or
        from several teachers); the result must be something
        `compute_distillation_loss` accepts.

        Args:
            x: the input batch, as given to `fit`.

        Returns:
            The teacher's outputs, behind `ops.stop_gradient`.
        """
        with inference_only():
            outputs = self.teacher(x, training=False)
        return keras.tree.map_structure(ops.stop_gradient, outputs)

    # --------------------------------------------------------------- loss

    def compute_student_loss(self, x, y, y_pred, sample_weight=None):
        """The hard-label loss of the student, or `None` without `loss`.

        Args:
            x: the input batch.
            y: the labels.
            y_pred: the student's outputs.
            sample_weight: optional sample weights.

        Returns:
            A scalar, or `None` when `compile` was given no `loss`.
        """
        del x
        if self._compile_loss is None:
            return None
        return self._compile_loss(y, y_pred, sample_weight)

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        """The distillation term: `distillation_loss(teacher, student)`.

        For nested outputs the loss is applied to each (teacher, student)
        pair of leaves and the values are summed. The student's Keras mask,
        if any, is applied by the loss.

        Args:
            x: the input batch.
            y: the labels (unused here; available to subclasses).
            y_pred: the student's outputs, from this step's forward pass.
            teacher_pred: the output of `teacher_predictions(x)`.
            sample_weight: optional sample weights, one tensor or one per
                output.

        Returns:
            A scalar.
        """
        del x, y
        check_matching_outputs(teacher_pred, y_pred)
        teachers = keras.tree.flatten(teacher_pred)
        students = keras.tree.flatten(y_pred)
        if isinstance(sample_weight, (list, tuple, dict)):
            weights = keras.tree.flatten(sample_weight)
        else:
            weights = [sample_weight] * len(students)
        values = [
            self._distillation_loss(t, s, sample_weight=w)
            for t, s, w in zip(teachers, students, weights)
        ]
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """`alpha * student_loss + (1 - alpha) * distillation_loss`.

        Keras calls this with the `y_pred` of its own forward pass, so the
        student runs once per step. The two terms are tracked as
        `student_loss` and `distillation_loss`; the total is Keras' `loss`.
        """
        if self._distillation_loss is None:
            raise ValueError(
                "The Distiller must be compiled before training: call "
                "`distiller.compile(optimizer, loss, distillation_loss, "
                "alpha)`."
            )
        teacher_pred = self.teacher_predictions(x)
        distillation = self.compute_distillation_loss(
            x, y, y_pred, teacher_pred, sample_weight
        )
        student = self.compute_student_loss(x, y, y_pred, sample_weight)
        if student is None:
            total = distillation
        else:
            student = ops.cast(student, distillation.dtype)
            alpha = ops.cast(self.alpha, distillation.dtype)
            total = alpha * student + (1.0 - alpha) * distillation
        for extra in self.losses:
            total = total + ops.cast(ops.sum(extra), total.dtype)
        batch_size = ops.shape(
            next(t for t in keras.tree.flatten(x) if t is not None)
        )[0]
        if student is not None:
            self._student_loss_tracker.update_state(
                unscale_for_replicas(student), sample_weight=batch_size
            )
        self._distillation_loss_tracker.update_state(
            unscale_for_replicas(distillation), sample_weight=batch_size
        )
        return total

    @property
    def distillation_loss(self):
        """The compiled distillation loss, its temperature bound to
        `self.temperature` when it has one (`None` before `compile`)."""
        return self._distillation_loss

    # ------------------------------------------------------------ metrics

    @property
    def metrics(self):
        metrics = super().metrics
        if not self.compiled:
            return metrics
        own = (
            self._both_terms
            if self._compile_loss is not None
            else self._distillation_term
        )
        skip = {
            id(self._both_terms),
            id(self._distillation_term),
            id(self._student_loss_tracker),
            id(self._distillation_loss_tracker),
        }
        rest = [m for m in metrics if id(m) not in skip]
        return rest[:1] + [own] + rest[1:]

    # ------------------------------------------------------------ compile

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        distillation_loss=None,
        alpha=0.1,
        metrics=None,
        **kwargs,
    ):
        """Configures the Distiller for training.

        Args:
            optimizer: an optimizer (or its name) for the student.
            loss: the student's hard-label loss, as for `Model.compile`
                (computed on the student's outputs against `y`). `None` for
                pure distillation: the total is then the distillation loss
                alone and `alpha` is not used.
            distillation_loss: a `keras.losses.Loss` called as
                `loss(teacher_outputs, student_outputs, sample_weight)`.
                Defaults to `keras_kd.losses.KLDivergence()` (logits, T=1).
                If it is a keras-kd loss with a `temperature`, the Distiller
                uses a copy whose temperature is `self.temperature`, set to
                the loss's value (the caller's loss object is not changed).
            alpha: weight of `loss` in `[0, 1]`; `1 - alpha` weights the
                distillation loss.
            metrics: metrics of the student's outputs against `y`.
            **kwargs: other `Model.compile` arguments (`weighted_metrics`,
                `jit_compile`, `steps_per_execution`, `run_eagerly`, ...).
        """
        alpha = validate_alpha(alpha)
        if distillation_loss is None:
            distillation_loss = kd_losses.KLDivergence()
        validate_distillation_loss(distillation_loss)
        # Keras keeps an earlier `loss` when recompiled with `loss=None`.
        self._compile_loss = None
        super().compile(
            optimizer=optimizer, loss=loss, metrics=metrics, **kwargs
        )
        self._distillation_loss = self._bind_temperature(distillation_loss)
        self.alpha.assign(alpha)
        self._compile_config.config.update(
            distillation_loss=distillation_loss, alpha=alpha
        )

    def _bind_temperature(self, loss):
        if not (
            isinstance(loss, kd_losses.DivergenceLoss)
            and "temperature" in loss._fn_args
        ):
            return loss
        bound = type(loss).from_config(loss.get_config())
        self.temperature.assign(float(ops.convert_to_numpy(loss.temperature)))
        bound.temperature = self.temperature
        return bound

    def get_compile_config(self):
        if self.compiled and hasattr(self, "_compile_config"):
            return self._compile_config.serialize()
        return {}

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------- config

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "student": keras.saving.serialize_keras_object(self.student),
            "teacher": keras.saving.serialize_keras_object(self.teacher),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("student", "teacher"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
