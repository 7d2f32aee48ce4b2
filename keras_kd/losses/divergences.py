"""Distribution divergences for distillation: KL, symmetric KL, JSD."""

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss


@export
class KLDivergence(DivergenceLoss):
    """Temperature-scaled KL divergence `KL(teacher || student)`.

    `y_true` is the target (teacher) and `y_pred` the prediction (student),
    both logits by default. Unlike `keras.losses.KLDivergence` nothing is
    clipped: the value is computed in log space for any finite logits, to
    the accuracy documented in `keras_kd.ops`: a relative 1e-5 of the
    divergence on the precise path (also for a student close to its
    teacher, and at `T = 1000`), at most
    `1e-5 * T**2 * (1 + E|log P| + E|log Q|)` absolute on the fast one.
    Never negative. The gradient is the closed form
    `T * (softmax(s / T) - softmax(t / T))`. A NaN in a row gives NaN for
    that row; an empty batch gives 0.

    Formula:

    ```
    P = softmax(y_true / T), log Q = log_softmax(y_pred / T)
    loss = T**2 * sum(P * (log P - log Q), axis=-1)
    ```

    For `[batch, length, vocab]` inputs the value is per token and the
    default reduction averages over all tokens. For the mean over real
    tokens, give the student's output a Keras mask (e.g. from
    `Embedding(mask_zero=True)`), or pass the padding mask as
    `sample_weight` with `reduction="mean_with_sample_weight"` (with the
    default reduction a `sample_weight` zeroes padded tokens but still
    divides by every position). torch's `F.kl_div(...,
    reduction="batchmean")` on such inputs divides the total by the batch
    size instead: use `reduction="sum"` and divide by the batch size.

    Args:
        temperature: softening temperature `T > 0`.
        from_logits: whether inputs are logits (default) or probabilities.
        axis: the class axis.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
        precise: `None` (default), `True` or `False`: the precise path
            (exact to a relative 1e-5 also for a student close to its
            teacher), or the fast one; `None` is the fast path, on every
            backend and device measured (see `keras_kd.ops`).

    Example:

    ```python
    loss = keras_kd.losses.KLDivergence(temperature=2.0)
    loss(teacher_logits, student_logits)
    # equals, in torch:
    # F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1),
    #          reduction="batchmean") * T**2
    ```

    Reverse KL `KL(student || teacher)` is `ReverseKLDivergence`.
    """

    fn = staticmethod(kd_ops.kl_divergence)
    _fn_args = ("from_logits", "temperature", "axis", "precise")
    divergence = "kl"

    def __init__(
        self,
        temperature=1.0,
        from_logits=True,
        axis=-1,
        reduction="sum_over_batch_size",
        name="kl_divergence",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            temperature=temperature,
            from_logits=from_logits,
            axis=axis,
            precise=precise,
        )


def _reverse_kl_divergence(y_true, y_pred, **kwargs):
    return kd_ops.kl_divergence(y_pred, y_true, **kwargs)


@export
class ReverseKLDivergence(DivergenceLoss):
    """Reverse KL divergence `KL(student || teacher)` (mode seeking).

    Same arguments and temperature convention as `KLDivergence`; the student
    distribution is the one that weights the log ratio:

    ```
    loss = T**2 * sum(Q * (log Q - log P), axis=-1)
    ```
    """

    fn = staticmethod(_reverse_kl_divergence)
    _fn_args = ("from_logits", "temperature", "axis", "precise")
    divergence = "reverse_kl"

    def __init__(
        self,
        temperature=1.0,
        from_logits=True,
        axis=-1,
        reduction="sum_over_batch_size",
        name="reverse_kl_divergence",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            temperature=temperature,
            from_logits=from_logits,
            axis=axis,
            precise=precise,
        )


@export
class SymmetricKLDivergence(DivergenceLoss):
    """Symmetric KL divergence `KL(P || Q) + KL(Q || P)`.

    Formula:

    ```
    loss = T**2 * sum((P - Q) * (log P - log Q), axis=-1)
    ```

    Args:
        temperature: softening temperature `T > 0`.
        from_logits: whether inputs are logits (default) or probabilities.
        axis: the class axis.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
        precise: `None` (default), `True` or `False`: the precise path
            (exact to a relative 1e-5 also for a student close to its
            teacher), or the fast one; `None` is the fast path, on every
            backend and device measured (see `keras_kd.ops`).
    """

    fn = staticmethod(kd_ops.symmetric_kl_divergence)
    _fn_args = ("from_logits", "temperature", "axis", "precise")
    divergence = "symmetric_kl"

    def __init__(
        self,
        temperature=1.0,
        from_logits=True,
        axis=-1,
        reduction="sum_over_batch_size",
        name="symmetric_kl_divergence",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            temperature=temperature,
            from_logits=from_logits,
            axis=axis,
            precise=precise,
        )


@export
class JensenShannonDivergence(DivergenceLoss):
    """Generalized Jensen-Shannon divergence (GKD convention).

    Formula:

    ```
    M = beta * P + (1 - beta) * Q
    loss = T**2 * (beta * KL(P || M) + (1 - beta) * KL(Q || M))
    ```

    `beta = 0` is exactly `KL(P || Q)` (forward, teacher first) and
    `beta = 1` exactly `KL(Q || P)` (reverse); `beta = 0.5` is the classic
    symmetric JSD, bounded by `T**2 * log 2`.

    Args:
        beta: mixing weight in `[0, 1]`.
        temperature: softening temperature `T > 0`.
        from_logits: whether inputs are logits (default) or probabilities.
        axis: the class axis.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
        precise: `None` (default), `True` or `False`: the precise path
            (exact to a relative 1e-5 also for a student close to its
            teacher), or the fast one; `None` is the fast path, on every
            backend and device measured (see `keras_kd.ops`).

    Reference:
        Agarwal et al. On-Policy Distillation of Language Models. ICLR 2024.
    """

    fn = staticmethod(kd_ops.jensen_shannon_divergence)
    _fn_args = ("beta", "from_logits", "temperature", "axis", "precise")
    divergence = "jsd"

    def __init__(
        self,
        beta=0.5,
        temperature=1.0,
        from_logits=True,
        axis=-1,
        reduction="sum_over_batch_size",
        name="jensen_shannon_divergence",
        dtype=None,
        precise=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            beta=_checks.fraction("beta", beta),
            temperature=temperature,
            from_logits=from_logits,
            axis=axis,
            precise=precise,
        )
