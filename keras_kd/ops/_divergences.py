"""Divergences of softmax distributions: KL, entropy, cross-entropy,
symmetric KL, Jensen-Shannon, and the R-Drop pair divergence."""

import math

from keras import ops

from keras_kd.ops._core import (
    _as_float,
    _pair,
    _plogp_ratio,
    _plogq,
    _times_t_squared,
    finite_log_probabilities,
    log_probabilities,
    validate_beta,
    validate_temperature,
)

# ------------------------------------------------------------- divergences


def kl_divergence(y_true, y_pred, from_logits=True, temperature=1.0, axis=-1):
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

    Terms where `P == 0` contribute exactly 0.

    Args:
        y_true: target logits (or probabilities), e.g. the teacher's.
        y_pred: predicted logits (or probabilities), same shape.
        from_logits: whether the inputs are logits. With `False` they are
            probabilities whose rows sum to 1.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.

    Returns:
        The divergence with `axis` removed, e.g. `[batch]` for
        `[batch, classes]` inputs.

    Example:

    >>> kl_divergence([[1., 2., 3.]], [[1.2, 2.1, 2.9]], temperature=2.0)

    Reference:
        Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network.
        2015. https://arxiv.org/abs/1503.02531
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    log_p = finite_log_probabilities(y_true, from_logits, temperature, axis)
    log_q = finite_log_probabilities(y_pred, from_logits, temperature, axis)
    # Finite logs: where p == 0, exp(log_p) is exactly 0 and so is the term.
    value = ops.sum(ops.exp(log_p) * (log_p - log_q), axis=axis)
    # A fully masked teacher row was made uniform to stay finite; it has no
    # mass and contributes 0. The test runs on the reduced tensor only.
    empty = -math.inf if from_logits else 0.0
    row_has_mass = ops.max(y_true, axis=axis) > empty
    value = ops.where(row_has_mass, value, 0.0)
    return _times_t_squared(value, temperature)


def entropy(y_true, from_logits=True, temperature=1.0, axis=-1):
    """Shannon entropy `H(P) = -sum(P log P)` in nats.

    Args:
        y_true: logits (or probabilities) of `P`.
        from_logits: whether `y_true` holds logits.
        temperature: the logits are divided by it (no `T**2` factor: the
            entropy is not a distillation loss).
        axis: the class axis, summed away.

    Returns:
        The entropy with `axis` removed.
    """
    log_p = log_probabilities(y_true, from_logits, temperature, axis)
    return -ops.sum(_plogq(log_p, log_p), axis=axis)


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
    y_true, y_pred = _pair(y_true, y_pred)
    log_p = log_probabilities(y_true, from_logits, temperature, axis)
    log_q = log_probabilities(y_pred, from_logits, temperature, axis)
    return -ops.sum(_plogq(log_p, log_q), axis=axis)


def symmetric_kl_divergence(
    y_true, y_pred, from_logits=True, temperature=1.0, axis=-1
):
    """Symmetric KL divergence `KL(P || Q) + KL(Q || P)`.

    Formula:

    ```
    loss = T**2 * sum((P - Q) * (log P - log Q), axis=axis)
    ```

    For softmax outputs this equals `sum((P - Q) * (s - t))` over the logits:
    the normalizers cancel (Su, 2022).

    Entries that are `-inf` in both inputs contribute 0.

    Args:
        y_true: logits (or probabilities) of `P`.
        y_pred: logits (or probabilities) of `Q`.
        from_logits: whether the inputs are logits.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.

    Returns:
        The divergence with `axis` removed.
    """
    temperature = validate_temperature(temperature)
    y_true, y_pred = _pair(y_true, y_pred)
    log_p = log_probabilities(y_true, from_logits, temperature, axis)
    log_q = log_probabilities(y_pred, from_logits, temperature, axis)
    value = ops.sum(
        _plogp_ratio(log_p, log_q) + _plogp_ratio(log_q, log_p), axis=axis
    )
    return _times_t_squared(value, temperature)


def jensen_shannon_divergence(
    y_true, y_pred, beta=0.5, from_logits=True, temperature=1.0, axis=-1
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
    formed in log space with `logsumexp`, never from probabilities.

    Args:
        y_true: target logits (or probabilities) `P`, e.g. the teacher's.
        y_pred: predicted logits (or probabilities) `Q`, e.g. the student's.
        beta: mixing weight in `[0, 1]`.
        from_logits: whether the inputs are logits.
        temperature: softening temperature `T > 0`.
        axis: the class axis, summed away.

    Returns:
        The divergence with `axis` removed.

    Reference:
        Agarwal et al. On-Policy Distillation of Language Models: Learning
        from Self-Generated Mistakes (GKD). ICLR 2024.
        https://arxiv.org/abs/2306.13649
    """
    beta = validate_beta(beta)
    temperature = validate_temperature(temperature)
    if beta == 0.0:
        return kl_divergence(y_true, y_pred, from_logits, temperature, axis)
    if beta == 1.0:
        return kl_divergence(y_pred, y_true, from_logits, temperature, axis)
    y_true, y_pred = _pair(y_true, y_pred)
    log_p = log_probabilities(y_true, from_logits, temperature, axis)
    log_q = log_probabilities(y_pred, from_logits, temperature, axis)
    log_m = _log_mixture(log_p, log_q, beta)
    value = beta * ops.sum(_plogp_ratio(log_p, log_m), axis=axis) + (
        1.0 - beta
    ) * ops.sum(_plogp_ratio(log_q, log_m), axis=axis)
    return _times_t_squared(value, temperature)


def _log_mixture(log_p, log_q, beta):
    # log(beta * P + (1 - beta) * Q) by a two-term logsumexp. M > 0 wherever
    # P > 0 or Q > 0, and only those entries are ever read.
    a = log_p + math.log(beta)
    b = log_q + math.log1p(-beta)
    high = ops.maximum(a, b)
    low = ops.minimum(a, b)
    finite = high > -math.inf
    high_safe = ops.where(finite, high, 0.0)
    low_safe = ops.where(finite, low, 0.0)
    return ops.where(
        finite, high_safe + ops.log1p(ops.exp(low_safe - high_safe)), -math.inf
    )


# ------------------------------------------------------------------ R-Drop


def paired_symmetric_kl_divergence(y_pred, divergence=None, from_logits=True):
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
            return symmetric_kl_divergence(a, b, from_logits=from_logits)

    value = divergence(y_pred[0::2], y_pred[1::2])
    return ops.repeat(value, 2, axis=0)
