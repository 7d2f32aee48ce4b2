"""The `Distiller`: train a student against frozen teachers with `fit`."""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd import _model_utils as utils
from keras_kd import losses as kd_losses
from keras_kd._keras_compat import LossTrackers, forget_compiled_loss
from keras_kd.api import export
from keras_kd.distillers import _fused_terms
from keras_kd.distillers._frozen_teacher import FrozenTeachers


@export
class Distiller(FrozenTeachers, keras.Model):
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
    (or no labels in the data) the first term is dropped and
    `loss = distillation_loss` (pure distillation). `sample_weight` and
    Keras masks on the student's output weight both terms; without labels,
    `fit(x, sample_weight=w)` weights the distillation term.

    Per step the student runs once (Keras' own forward pass; `compute_loss`
    reuses its `y_pred`) and the teacher once, in inference mode, behind
    `ops.stop_gradient` (and, on PyTorch, under `torch.no_grad()`). With
    dict inputs each model receives its own inputs, picked by name.

    The teacher is never trained and never modified: its weights are left
    out of the Distiller's `trainable_weights` (they are listed in
    `non_trainable_weights`), it always runs with `training=False`, so its
    BatchNormalization statistics and dropout stay fixed, and its
    `trainable` flags are left as they are. A variable shared by teacher
    and student (a shared embedding, say) is an error at construction. The
    teacher's own regularization losses are constants and left out.

    `alpha` and the distillation temperature are scalar `keras.Variable`s
    owned by the Distiller (`distiller.alpha`, `distiller.temperature`), so
    callbacks (`keras_kd.callbacks.AlphaScheduler`, `TemperatureScheduler`)
    can change them between epochs inside compiled train functions. They
    are saved with the weights.

    History and logs carry `loss`, `student_loss` (when `loss` is given),
    `distillation_loss` and every compiled metric, with `val_` variants.

    Extension points (override in a subclass):

    - `student_inputs(x)`: the part of the batch the student takes.
    - `teacher_predictions(x)`: the teacher signal for the batch `x`. The
      base runs `teacher`; a subclass may read cached outputs from `x`
      (`OfflineDistiller`) or combine several teachers
      (`MultiTeacherDistiller`). A subclass that overrides it may be built
      with `teacher=None`.
    - `compute_distillation_loss(x, y, y_pred, teacher_pred, sample_weight)`:
      the distillation term as a scalar (override it to distill only some
      of the student's outputs).
    - `compute_student_loss(x, y, y_pred, sample_weight)`: the hard-label
      term, or `None`.

    Args:
        student: the `keras.Model` to train.
        teacher: a built `keras.Model` whose outputs have the same structure
            and shapes as the student's (checked on the first batch).
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

    def __init__(self, student, teacher=None, **kwargs):
        super().__init__(**kwargs)
        self.student = _checks.model("student", student)
        if teacher is not None:
            self._add_teachers("teacher", [teacher])
        elif self._uses_base_teacher():
            raise _checks.invalid("teacher", "a built `keras.Model`", teacher)
        self.teacher = teacher
        self.alpha = self._scalar_variable("alpha", 0.1)
        self.temperature = self._scalar_variable("temperature", 1.0)
        self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
        self.distillation_loss_tracker = keras.metrics.Mean(
            name="distillation_loss"
        )
        self._both_terms = LossTrackers(
            [self.student_loss_tracker, self.distillation_loss_tracker],
            name="distiller_loss_terms",
        )
        self._distillation_term = LossTrackers(
            [self.distillation_loss_tracker], name="distillation_loss_term"
        )
        self._distillation_loss = self._fused = None
        if student.built:
            self.built = True

    def _uses_base_teacher(self):
        return type(self).teacher_predictions is Distiller.teacher_predictions

    def _scalar_variable(self, name, value):
        return self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(value),
            dtype="float32",
            trainable=False,
            autocast=False,
            name=name,
        )

    # ------------------------------------------------------------ forward

    def student_inputs(self, x):
        """The part of the batch `x` the student takes (its own inputs,
        picked by name from a dict batch)."""
        return utils.inputs_for(self.student, x)

    def call(self, inputs, training=None):
        """Runs the student: `predict` returns the student's outputs."""
        return self.student(self.student_inputs(inputs), training=training)

    def teacher_predictions(self, x):
        """The teacher's outputs for the batch `x` (as given to `fit`): one
        inference-mode call on its own inputs, behind `stop_gradient`."""
        return utils.frozen_call(self.teacher, x)

    # --------------------------------------------------------------- loss

    def compute_student_loss(self, x, y, y_pred, sample_weight=None):
        """The student's compiled loss against `y` (a scalar), or `None`
        without `loss` in `compile` or without labels."""
        if self.loss is None or y is None:
            return None
        # Keras' own compute_loss adds the regularization losses, which the
        # total adds once, unweighted by alpha.
        total = super().compute_loss(x, y, y_pred, sample_weight)
        regularization = self._regularization()
        if regularization is None:
            return total
        return total - ops.cast(regularization, total.dtype)

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        """`distillation_loss(teacher_pred, y_pred, sample_weight)` as a
        scalar; for nested outputs, summed over the (teacher, student)
        pairs of leaves, whose structures and shapes must match. The
        student's Keras masks are applied by the loss. `y` is unused here
        (subclasses may use it)."""
        del x, y
        utils.check_pairs(teacher_pred, y_pred)
        teachers = keras.tree.flatten(teacher_pred)
        students = keras.tree.flatten(y_pred)
        if isinstance(sample_weight, (list, tuple, dict)):
            weights = keras.tree.flatten(sample_weight)
        else:
            weights = [sample_weight] * len(students)
        total = None
        for t, s, w in zip(teachers, students, weights):
            w = utils.own_copy(w)
            value = self._distillation_loss(t, s, sample_weight=w)
            total = value if total is None else total + value
        return total

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """`alpha * student_loss + (1 - alpha) * distillation_loss`, plus
        the student's regularization losses.

        Keras calls this with the `y_pred` of its own forward pass, so the
        student runs once per step. The two terms are tracked (weighted by
        batch size) as `student_loss` and `distillation_loss`. For a
        `SparseCategoricalCrossentropy(from_logits=True)` with a keras-kd
        `KLDivergence` a training step on JAX or TensorFlow takes both from
        one op (`ops.sparse_crossentropy_and_kl_divergence`).
        """
        if self._distillation_loss is None:
            raise ValueError(
                "The Distiller must be compiled before training: call "
                "`distiller.compile(optimizer, loss, distillation_loss, "
                "alpha)`."
            )
        if utils.is_placeholder(y):
            y = None
        teacher_pred = self.teacher_predictions(x)
        # Not fused outside training (Keras builds its compiled loss then).
        plan = self._fused if training else None
        both = _fused_terms.terms(plan, y, y_pred, teacher_pred, sample_weight)
        if both is None:
            both = (
                self.compute_student_loss(
                    x, y, y_pred, utils.own_copy(sample_weight)
                ),
                self.compute_distillation_loss(
                    x, y, y_pred, teacher_pred, utils.own_copy(sample_weight)
                ),
            )
        student, distillation = both
        if student is None:
            total = distillation
        else:
            student = ops.cast(student, distillation.dtype)
            alpha = ops.cast(self.alpha, distillation.dtype)
            total = alpha * student + (1.0 - alpha) * distillation
        regularization = self._regularization()
        if regularization is not None:
            total = total + ops.cast(regularization, total.dtype)
        rows = utils.batch_size(x)
        if student is not None:
            self.student_loss_tracker.update_state(
                utils.unscale_for_replicas(student), sample_weight=rows
            )
        self.distillation_loss_tracker.update_state(
            utils.unscale_for_replicas(distillation), sample_weight=rows
        )
        return total

    def _regularization(self):
        return utils.regularization(self.losses)

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if utils.is_placeholder(y):
            y = None
        if y is None:
            # No labels: the compiled metrics have nothing to compare.
            return self.get_metrics_result()
        return super().compute_metrics(x, y, y_pred, sample_weight)

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
        own = [self._loss_terms()] + self._extra_terms()
        skip = {id(self._both_terms), id(self._distillation_term)}
        for container in [self._both_terms] + own:
            skip.add(id(container))
            skip.update(id(m) for m in container.metrics)
        rest = [m for m in metrics if id(m) not in skip]
        return rest[:1] + own + rest[1:]

    def _loss_terms(self):
        if self.loss is not None:
            return self._both_terms
        return self._distillation_term

    def _extra_terms(self):
        """Further `LossTrackers` of subclasses, logged after the terms."""
        return []

    # ------------------------------------------------------- fit with data

    def fit(self, x=None, y=None, *args, **kwargs):
        y, kwargs = utils.carry_weights_without_labels(y, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        y, kwargs = utils.carry_weights_without_labels(y, kwargs)
        return super().evaluate(x, y, *args, **kwargs)

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
        alpha = _checks.fraction("alpha", alpha)
        if distillation_loss is None:
            distillation_loss = self._default_distillation_loss()
        if not isinstance(distillation_loss, keras.losses.Loss):
            raise _checks.invalid(
                "distillation_loss",
                "a `keras.losses.Loss` instance, e.g. "
                "`keras_kd.losses.KLDivergence(temperature=4.0)` (wrap a "
                "function `f(y_true, y_pred)` in "
                "`keras.losses.LossFunctionWrapper(f)`)",
                distillation_loss,
            )
        if loss is None:
            forget_compiled_loss(self)
        super().compile(
            optimizer=optimizer, loss=loss, metrics=metrics, **kwargs
        )
        self._distillation_loss = self._bind_temperature(distillation_loss)
        self._given_distillation_loss = distillation_loss
        self.alpha.assign(alpha)
        # Hinton's pair as one op where it applies (`_fused_terms`).
        self._fused = _fused_terms.plan(
            self, Distiller, loss, kwargs.get("loss_weights")
        )

    def _default_distillation_loss(self):
        return kd_losses.KLDivergence()

    def _bind_temperature(self, loss):
        temperature = getattr(loss, "temperature", None)
        if not isinstance(loss, kd_losses.DivergenceLoss) or (
            temperature is None
        ):
            return loss
        bound = type(loss).from_config(loss.get_config())
        value = _checks.temperature(temperature)
        if isinstance(value, keras.Variable):
            value = ops.convert_to_numpy(value)
        self.temperature.assign(float(value))
        bound.temperature = self.temperature
        return bound

    def get_compile_config(self):
        config = super().get_compile_config()
        if config:
            config["distillation_loss"] = keras.saving.serialize_keras_object(
                self._given_distillation_loss
            )
            config["alpha"] = float(ops.convert_to_numpy(self.alpha))
        return config

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # ------------------------------------------------------------- config

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config["student"] = keras.saving.serialize_keras_object(self.student)
        if getattr(self, "teacher", None) is not None:
            config["teacher"] = keras.saving.serialize_keras_object(
                self.teacher
            )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        models = utils.deserialized(
            config, ("student", "teacher"), custom_objects
        )
        return cls(**models)
