"""`DKDDistiller`: the Distiller for losses that need the labels (DKD)."""

from keras import ops

from keras_kd import losses as kd_losses
from keras_kd.api import export
from keras_kd.distillers.distiller import Distiller


@export
class DKDDistiller(Distiller):
    """A `Distiller` that gives its distillation loss the labels too.

    The distillation loss is called as
    `loss((teacher_outputs, y), student_outputs, sample_weight)`, the form
    `keras_kd.losses.DecoupledKD` takes; the default distillation loss is
    `DecoupledKD()` (the paper's `alpha=1, beta=8, T=4`). Everything else
    (the total `alpha * loss + (1 - alpha) * distillation_loss`, the
    frozen teacher, the schedulers) is the `Distiller`'s.

    The Distiller counts its training steps in a non-trainable variable,
    `distiller.step` (saved with the weights, so a resumed run continues
    the count), and binds it to the loss's `step`, so DKD's warm-up ramp
    advances inside compiled train functions on every backend without a
    callback. Evaluation does not advance it.

    Args:
        student: the `keras.Model` to train (a single output of logits).
        teacher: a built `keras.Model` with the same output shape.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    distiller = keras_kd.DKDDistiller(student, teacher)
    distiller.compile(
        "sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.DecoupledKD(
            alpha=1.0, beta=8.0, temperature=4.0,
            warmup_steps=20 * steps_per_epoch,
        ),
        alpha=0.5,
    )
    distiller.fit(x, y, epochs=240)
    ```
    """

    def __init__(self, student, teacher, **kwargs):
        super().__init__(student, teacher, **kwargs)
        self.step = self.add_weight(
            shape=(),
            initializer="zeros",
            dtype="int32",
            trainable=False,
            name="step",
        )

    def _default_distillation_loss(self):
        return kd_losses.DecoupledKD()

    def compile(self, *args, **kwargs):
        """As `Distiller.compile`; `distillation_loss` defaults to
        `keras_kd.losses.DecoupledKD()`."""
        super().compile(*args, **kwargs)
        if isinstance(self.distillation_loss, kd_losses.DecoupledKD):
            self.distillation_loss.step = self.step

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        """`distillation_loss((teacher_pred, y), y_pred, sample_weight)`."""
        del x
        if y is None:
            raise ValueError(
                "`DKDDistiller` needs the labels `y`: DKD splits the "
                "distributions at the target class."
            )
        return self.distillation_loss(
            (teacher_pred, y), y_pred, sample_weight=sample_weight
        )

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if training:
            self.step.assign_add(ops.ones((), "int32"))
        return super().compute_loss(
            x, y, y_pred, sample_weight=sample_weight, training=training
        )
