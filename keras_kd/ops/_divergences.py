"""Divergences of softmax distributions: KL, entropy, cross-entropy,
symmetric KL, Jensen-Shannon, and the R-Drop pair divergence."""

from keras import ops

from keras_kd.ops._core import (
    _as_float,
    _check_same_shape,
    _finite_log_probabilities,
    _logits_of,
    _pair,
    validate_beta,
    validate_temperature,
)
from keras_kd.ops._gradients import resolve_precise
from keras_kd.ops._half_logits import keeps_half
from keras_kd.ops._softmax_driver import softmax_divergence
from keras_kd.ops._softmax_terms import _log_mixture as _log_mixture

# ------------------------------------------------------------- divergences
#
# All of these work on `_finite_log_probabilities`: an entry with no mass has
# the log `L` (the dtype's lowest value), `exp(L)` is exactly 0, and
# differences of logs stay finite, so `p * (log p - log q)` is exactly 0
# where `p == 0` without a `where`, a NaN in a row reaches the row's value,
# and gradients are finite.


def _logs(y_true, y_pred, from_logits, temperature, axis):
    y_true, y_pred = _pair(y_true, y_pred)
    return (
        _finite_log_probabilities(y_true, from_logits, temperature, axis),
        _finite_log_probabilities(y_pred, from_logits, temperature, axis),
    )


def _divergence(
    kind, y_true, y_pred, from_logits, temperature, axis, precise, beta=None
):
    temperature = validate_temperature(temperature)
    precise = resolve_precise(precise)
    t, s = ops.convert_to_tensor(y_true), ops.convert_to_tensor(y_pred)
    if keeps_half(t, s, from_logits, axis):
        _check_same_shape(t, s)  # `_pair` checks it on the other path
        # Never a float32 copy of either (see `_half_logits`).
        return softmax_divergence(kind, t, s, temperature, axis, precise, beta)
    t, s = _pair(t, s)
    # Probabilities become logits outside the closed-form gradient, so
    # autodiff carries it through the log.
    t, s = _logits_of(t, from_logits), _logits_of(s, from_logits)
    return softmax_divergence(kind, t, s, temperature, axis, precise, beta)


def kl_divergence(
    y_true, y_pred, from_logits=True, temperature=1.0, axis=-1, precise=None
):
    """Kullback-Leibler divergence `KL(P || Q)` of the target from the
    prediction.

    `P` is the target (teacher) distribution, `Q` the prediction (student).
    This is the forward KL used in classic distillation; the reverse KL
    `KL(Q || P)` is the same call with the arguments swapped:
    `kl_divergence(y_pred, y_true)`.

    Formula:

    ```
    P = softmax(y_true / T), log Q = log_softmax(y_pred / T)
    loss = T**2 * sum(P * (log P - log Q), axis=axis)
    ```

    Terms where `P == 0` contribute exactly 0, and a fully masked target
    row contributes 0. A NaN anywhere in a row of either input gives NaN
    for that row. Where `P` has mass and `Q` has none the value is infinite
    in the math; it comes out as `+inf` or as a value near the float maximum.

    Args:
        y_true: target logits (or probabilities), e.g. the teacher's.
        y_pred: predicted logits (or probabilities), same shape.
        from_logits: whether the inputs are logits. With `False` they are
            probabilities whose rows sum to 1.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.
        precise: `None` (default), `True` or `False`: the precise path,
            exact to a relative 1e-5 also when student and teacher nearly
            agree (see `keras_kd.ops`), or the fast one. `None` is the
            fast path, on every backend and device measured
            (`keras_kd.ops._gradients.resolve_precise`).

    Returns:
        The divergence with `axis` removed, e.g. `[batch]` for
        `[batch, classes]` inputs, in the inputs' dtype (float32 for half
        precision).

    Example:

    >>> kl_divergence([[1., 2., 3.]], [[1.2, 2.1, 2.9]], temperature=2.0)

    Reference:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network.
        2015. https://arxiv.org/abs/1503.02531
    """
    return _divergence(
        "kl", y_true, y_pred, from_logits, temperature, axis, precise
    )


def entropy(y_true, from_logits=True, temperature=1.0, axis=-1):
    """Shannon entropy `H(P) = -sum(P log P)` in nats.

    Args:
        y_true: logits (or probabilities) of `P`.
        from_logits: whether `y_true` holds logits.
        temperature: the logits are divided by it (no `T**2` factor: the
            entropy is not a distillation loss).
        axis: the class axis, summed away.

    Returns:
        The entropy with `axis` removed (0 for a fully masked row).
    """
    temperature = validate_temperature(temperature)
    log_p = _finite_log_probabilities(
        _as_float(y_true), from_logits, temperature, axis
    )
    return -ops.sum(ops.exp(log_p) * log_p, axis=axis)


def cross_entropy(y_true, y_pred, from_logits=True, temperature=1.0, axis=-1):
    """Cross-entropy `H(P, Q) = -sum(P log Q)` of soft targets, in nats.

    It satisfies `kl_divergence = cross_entropy - entropy` (at `T = 1`).

    Args:
        y_true: target logits (or probabilities) of `P`.
        y_pred: predicted logits (or probabilities) of `Q`.
        from_logits: whether the inputs are logits.
        temperature: the logits are divided by it (no `T**2` factor).
        axis: the class axis, summed away.

    Returns:
        The cross-entropy with `axis` removed.
    """
    temperature = validate_temperature(temperature)
    log_p, log_q = _logs(y_true, y_pred, from_logits, temperature, axis)
    return -ops.sum(ops.exp(log_p) * log_q, axis=axis)


def symmetric_kl_divergence(
    y_true, y_pred, from_logits=True, temperature=1.0, axis=-1, precise=None
):
    """Symmetric KL divergence `KL(P || Q) + KL(Q || P)`.

    Formula:

    ```
    loss = T**2 * sum((P - Q) * (log P - log Q), axis=axis)
    ```

    For softmax outputs this equals `sum((P - Q) * (s - t))` over the logits:
    the normalizers cancel (Su, 2022).

    Entries that are `-inf` in both inputs contribute 0. Every term
    `(P - Q)(log P - log Q)` is non-negative; the precise path writes it
    as `Q u expm1(u)` with `u = log P - log Q` exact to rounding.

    Args:
        y_true: logits (or probabilities) of `P`.
        y_pred: logits (or probabilities) of `Q`.
        from_logits: whether the inputs are logits.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.
        precise: `None` (default), `True` or `False`: the precise path,
            exact to a relative 1e-5 also when student and teacher nearly
            agree (see `keras_kd.ops`), or the fast one. `None` is the
            fast path, on every backend and device measured
            (`keras_kd.ops._gradients.resolve_precise`).

    Returns:
        The divergence with `axis` removed.
    """
    return _divergence(
        "symmetric_kl", y_true, y_pred, from_logits, temperature, axis, precise
    )


def jensen_shannon_divergence(
    y_true,
    y_pred,
    beta=0.5,
    from_logits=True,
    temperature=1.0,
    axis=-1,
    precise=None,
):
    """Generalized Jensen-Shannon divergence with mixing weight `beta`.

    Follows the convention of generalized knowledge distillation (GKD):
    with the mixture `M = beta * P + (1 - beta) * Q`,

    ```
    JSD_beta = T**2 * (beta * KL(P || M) + (1 - beta) * KL(Q || M))
    ```

    `beta = 0.5` is the usual symmetric JSD (bounded by `log 2` times
    `T**2`). The interior formula tends to 0 at both ends, so the end points
    are defined explicitly as in GKD: `beta = 0` is the forward
    `KL(P || Q)` and `beta = 1` the reverse `KL(Q || P)`. The mixture is
    formed in log space, never from probabilities. The precise path writes
    both parts as sums of non-negative terms of `l = log(M / Q) =
    log1p(beta * expm1(u))` (`u = log P - log Q`).

    Args:
        y_true: target logits (or probabilities) `P`, e.g. the teacher's.
        y_pred: predicted logits (or probabilities) `Q`, e.g. the student's.
        beta: mixing weight in `[0, 1]`.
        from_logits: whether the inputs are logits.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.
        precise: `None` (default), `True` or `False`: the precise path,
            exact to a relative 1e-5 also when student and teacher nearly
            agree (see `keras_kd.ops`), or the fast one. `None` is the
            fast path, on every backend and device measured
            (`keras_kd.ops._gradients.resolve_precise`).

    Returns:
        The divergence with `axis` removed.

    Reference:
        Agarwal et al. On-Policy Distillation of Language Models: Learning
        from Self-Generated Mistakes (GKD). ICLR 2024.
        https://arxiv.org/abs/2306.13649
    """
    beta = validate_beta(beta)
    args = (from_logits, temperature, axis, precise)
    if beta == 0.0:
        return kl_divergence(y_true, y_pred, *args)
    if beta == 1.0:
        return kl_divergence(y_pred, y_true, *args)
    return _divergence("jsd", y_true, y_pred, *args, beta=beta)


# ------------------------------------------------------------------ R-Drop


def paired_symmetric_kl_divergence(
    y_pred, divergence=None, from_logits=True, precise=None
):
    """Symmetric divergence between the two rows of each interleaved pair.

    The batch holds each example twice in a row, `[x0, x0, x1, x1, ...]`, as
    R-Drop feeds it. Rows `2i` and `2i + 1` are compared and the pair's value
    is repeated on both rows, so the mean over rows is the mean over pairs.

    Args:
        y_pred: predictions `[2 * pairs, ...]`.
        divergence: a function `(a, b) -> value` with the class axis
            removed; defaults to `symmetric_kl_divergence` with
            `from_logits`.
        from_logits: whether `y_pred` holds logits (default divergence only).
        precise: the path of the default divergence (see
            `symmetric_kl_divergence`).

    Returns:
        The divergence per row, `[2 * pairs, ...]` without the class axis.
    """
    y_pred = _as_float(y_pred)
    batch = y_pred.shape[0]
    if batch is not None and batch % 2:
        raise ValueError(
            "R-Drop needs a batch of interleaved pairs [x0, x0, x1, x1, ...]"
            f" and so an even batch size. Received: y_pred.shape="
            f"{tuple(y_pred.shape)}"
        )
    if divergence is None:

        def divergence(a, b):
            return symmetric_kl_divergence(
                a, b, from_logits=from_logits, precise=precise
            )

    value = divergence(y_pred[0::2], y_pred[1::2])
    return ops.repeat(value, 2, axis=0)
