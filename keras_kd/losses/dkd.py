"""The decoupled knowledge distillation (DKD) loss."""

from keras import ops

from keras_kd import _checks
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss
from keras_kd.ops import _dkd


@export
class DecoupledKD(DivergenceLoss):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022).

    Unlike the other distillation losses, DKD needs the labels: `y_true` is
    the pair `(teacher_logits, labels)` and `y_pred` the student's logits.
    `keras_kd.DKDDistiller` passes that pair; the plain `Distiller` does
    not.

    Formula:

    ```
    p = softmax(logits / T), b = [p_target, 1 - p_target]
    TCKD = KL(b_teacher || b_student)
    NCKD = KL(p_teacher[non-target] || p_student[non-target])  # renormalized
    loss = ramp * T**2 * (alpha * TCKD + beta * NCKD)
    ramp = min(step / warmup_steps, 1)    # 1 without warm-up
    ```

    All in log space (see `keras_kd.ops.decoupled_kd`): exact for
    confident logits. A row whose label is not a class index (outside
    `[0, classes)`) gives NaN, on every backend.

    Warm-up: the paper ramps the loss linearly over its first 20 epochs.
    Here the ramp counts training steps, so it advances inside compiled
    train functions with no callback: `step` is the number of the current
    training step, counted from 1 by the `DKDDistiller` that owns the loss
    (the first step uses `1 / warmup_steps`). For a ramp over `E` epochs
    use `warmup_steps = E * steps_per_epoch`. A `DecoupledKD` with
    `warmup_steps > 0` called on its own needs `loss.step` set to a number
    or a scalar variable.

    Args:
        alpha: weight of the target-class term TCKD (paper: 1.0), a
            Python or NumPy number `>= 0`.
        beta: weight of the non-target-class term NCKD (paper: 8.0), a
            Python or NumPy number `>= 0`.
        temperature: softening temperature `T > 0` (paper: 4.0).
        warmup_steps: length of the linear warm-up in training steps; 0 for
            none.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False` (see `keras_kd.ops.decoupled_kd`).

    Example:

    ```python
    distiller = keras_kd.DKDDistiller(student, teacher)
    distiller.compile(
        "adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        distillation_loss=keras_kd.losses.DecoupledKD(
            alpha=1.0, beta=8.0, temperature=4.0, warmup_steps=1000
        ),
        alpha=0.5,
    )
    ```

    Reference:
        Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation.
        CVPR 2022. https://arxiv.org/abs/2203.08679
    """

    fn = staticmethod(_dkd.decoupled_kd)
    _fn_args = ("alpha", "beta", "temperature", "axis", "precise")

    def __init__(
        self,
        alpha=1.0,
        beta=8.0,
        temperature=4.0,
        warmup_steps=0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="decoupled_kd",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            alpha=_checks.non_negative("alpha", alpha),
            beta=_checks.non_negative("beta", beta),
            temperature=temperature,
            axis=axis,
            precise=precise,
        )
        self.warmup_steps = _checks.integer("warmup_steps", warmup_steps, 0)
        self.step = None

    def call(self, y_true, y_pred):
        if not isinstance(y_true, (tuple, list)) or len(y_true) != 2:
            raise ValueError(
                "Invalid value for argument `y_true`. `DecoupledKD` expects "
                "the pair `(teacher_logits, labels)`; `keras_kd.DKDDistiller` "
                "passes it (the plain `Distiller` gives only the teacher's "
                f"logits). Received: y_true of type {type(y_true).__name__}"
            )
        teacher, labels = y_true
        value = _dkd.decoupled_kd(
            teacher,
            y_pred,
            labels,
            self.alpha,
            self.beta,
            self.temperature,
            self.axis,
            self.precise,
        )
        return value * self._ramp(value.dtype)

    def _ramp(self, dtype):
        if self.warmup_steps == 0:
            return ops.ones((), dtype)
        if self.step is None:
            raise ValueError(
                "`DecoupledKD(warmup_steps>0)` needs the training step: use "
                "it in a `keras_kd.DKDDistiller`, or set `loss.step` to the "
                "current step number (counted from 1)."
            )
        step = ops.cast(self.step, dtype)
        return ops.minimum(step / float(self.warmup_steps), 1.0)

    def get_config(self):
        config = super().get_config()
        config["warmup_steps"] = self.warmup_steps
        return config
