"""Hinton's two distillation terms, the hard-label cross-entropy and the
temperature KL, from one forward computation and with one closed-form
gradient."""

import math

from keras import ops

from keras_kd.ops import _log_ratio as lr
from keras_kd.ops._core import _log_softmax_parts, _pair, validate_temperature
from keras_kd.ops._dkd import _class_indices
from keras_kd.ops._gradients import (
    resolve_precise,
    torch_eager,
    with_gradient,
)
from keras_kd.ops._softmax_driver import (
    _optimistic_pair,
    reference_divergence,
)
from keras_kd.ops._softmax_terms import kl_terms


def sparse_crossentropy_and_kl_divergence(
    labels, y_true, y_pred, temperature=1.0, precise=None
):
    """The cross-entropy of `y_pred` against integer `labels` and the
    temperature KL of the teacher `y_true` from `y_pred`, computed together.

    The two terms of classic distillation (Hinton et al., 2015) each read
    the student's logits and each build a softmax of them. Computed as two
    separate losses (a Keras `SparseCategoricalCrossentropy` and a
    `KLDivergence`) they are two backward passes whose gradients are then
    added; here both terms come from one forward computation and the
    gradient is one elementwise expression (fused into one pass under
    XLA):

    ```
    Q1 = softmax(y_pred), Q = softmax(y_pred / T), P = softmax(y_true / T)
    cross_entropy = -log Q1[label]
    divergence    = T**2 * sum(P * (log P - log Q))
    d / d y_pred  = g_ce * (Q1 - onehot(label)) + g_kd * T * (Q - P)
    ```

    (`g_ce`, `g_kd`: the upstream gradients of the two terms, so any
    weighting and reduction of the two applies.) `keras_kd.Distiller` uses
    this when its compiled `loss` is a `SparseCategoricalCrossentropy` on
    logits and its distillation loss a `KLDivergence`.

    The divergence is `kl_divergence(y_true, y_pred, temperature=T,
    precise=precise)` to the last bit of its contract (the same engine);
    the cross-entropy is Keras' `sparse_categorical_crossentropy(labels,
    y_pred, from_logits=True)`, computed in log space (no clipping; a
    `-inf` logit is the dtype's lowest value, so a masked entry that is
    not the label contributes nothing, and a masked label gives about
    3.4e38 instead of NaN). A label outside `[0, classes)` gives NaN for
    both terms of its row, the same on every backend; a NaN in a row of
    either input gives NaN for that row.

    Args:
        labels: integer class indices shaped like the logits without the
            last axis (a trailing axis of size 1 is dropped, as Keras does).
        y_true: the teacher's logits `[..., classes]`.
        y_pred: the student's logits, same shape.
        temperature: `T > 0` of the divergence (the cross-entropy is at
            `T = 1`), a number or a scalar tensor or variable.
        precise: `None` (the fast path), `True` or `False`, for the
            divergence as in `kl_divergence`.

    Returns:
        `(cross_entropy, divergence)`, each shaped like `labels`, float32
        (float64 for float64 logits). Both carry their gradients.

    Example:

    >>> ce, kd = sparse_crossentropy_and_kl_divergence(
    ...     [2, 0], teacher_logits, student_logits, temperature=4.0)
    >>> loss = ops.mean(0.1 * ce + 0.9 * kd)
    """
    temperature = validate_temperature(temperature)
    precise = resolve_precise(precise)
    t, s = _pair(y_true, y_pred)
    if len(s.shape) < 1:
        raise ValueError(
            "Invalid value for argument `y_pred`. Expected logits with a "
            f"class axis. Received: y_pred.shape={tuple(s.shape)}"
        )
    labels, valid = _class_indices(labels, s)
    dtype = s.dtype
    constant = isinstance(temperature, float)
    constants = [labels, ops.cast(valid, dtype)]
    if not constant:
        constants.append(ops.cast(temperature, dtype))

    def forward(t, s, labels, valid, *temp, eager):
        temp = temperature if constant else temp[0]
        valid = valid > 0.5
        # Eager torch without `eager` computes no gradient at all (see
        # `with_gradient`): the KL then needs no `log P - log Q` whole.
        lazy = not eager and not torch_eager()
        teacher_grad = lazy or bool(getattr(t, "requires_grad", True))
        found = None
        if torch_eager():
            # Unguarded first, as the divergences do on torch: any input
            # the guards are for makes a value non-finite.
            found = _terms(t, s, labels, temp, precise, teacher_grad, True)
            if not bool(ops.all(ops.isfinite(found[0] + found[1]))):
                found = None
        if found is None:
            found = _terms(t, s, labels, temp, precise, teacher_grad, False)
        ce, kd, q1, kd_grads = found
        del found
        value = ops.stack(
            [ops.where(valid, ce, math.nan), ops.where(valid, kd, math.nan)],
            axis=-1,
        )

        def grads():
            grad_a, grad_b = kd_grads()
            # The one-hot built here, not passed in: under XLA the
            # comparison fuses into the subtraction.
            return q1 - _onehot(labels, s), grad_a, grad_b

        if eager:
            computed = grads()  # now, so that the pieces can be freed
            grads = lambda: computed  # noqa: E731

        def weighted(upstream):
            # Rows with an invalid label have a NaN value and no gradient.
            upstream = ops.where(ops.expand_dims(valid, -1), upstream, 0.0)
            up_ce = upstream[..., 0:1]
            up_kd = upstream[..., 1:2] * temp
            grad_ce, grad_a, grad_b = grads()
            grad_s = grad_ce * up_ce + grad_a * up_kd
            return (None if grad_b is None else grad_b * up_kd), grad_s

        return value, weighted

    def reference(t, s, labels, valid, *temp):
        temp = temperature if constant else temp[0]
        valid = valid > 0.5
        log_q1, _, _, _ = _log_softmax_parts(s, -1, 1.0)
        ce = -ops.sum(_onehot(labels, s) * log_q1, axis=-1)
        kd = reference_divergence("kl", t, s, temp, -1)
        both = ops.stack([ce, kd], axis=-1)
        return ops.where(ops.expand_dims(valid, -1), both, math.nan)

    both = with_gradient(forward, reference, (t, s), constants)
    return both[..., 0], both[..., 1]


def _terms(t, s, labels, temperature, precise, teacher_grad, optimistic):
    """`(cross_entropy, divergence, softmax(s), kl_grads)`; `optimistic`:
    torch's unguarded path (see `_softmax_driver._optimistic_pair`)."""
    if optimistic:
        log_q1 = ops.log_softmax(s, axis=-1)
        q1 = ops.softmax(s, axis=-1)
        pair = _optimistic_pair(t, s, temperature, -1)
        if precise:
            lr.optimistic_precise(pair, t, s, temperature, -1)
        pair.frugal = True
    else:
        log_q1, q1, _, _ = _log_softmax_parts(s, -1, 1.0, True)
        pair = lr.softmax_pair(t, s, temperature, -1, precise)
        pair.frugal = torch_eager()
    # Invalid labels were replaced by 0 (their rows come out NaN).
    picked = ops.take_along_axis(log_q1, ops.expand_dims(labels, -1), -1)
    ce = -ops.squeeze(picked, axis=-1)
    del log_q1
    kd, kd_grads = kl_terms(pair, teacher_grad)
    kd = ops.squeeze(kd, axis=-1) * (temperature * temperature)
    return ce, kd, q1, kd_grads


def _onehot(labels, logits):
    classes = ops.arange(logits.shape[-1], dtype="int32")
    return ops.cast(ops.expand_dims(labels, -1) == classes, logits.dtype)
