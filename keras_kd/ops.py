"""Divergences and losses as pure functions over `keras.ops`.

Every function here returns the *unreduced* value: the reduction axis (the
class axis, or the label grid of a GlobalPointer head) is summed away and
every other axis is kept, so `[batch, classes]` gives `[batch]` and
`[batch, length, vocab]` gives one value per token. Reduction, sample weights
and masks are the job of `keras.losses.Loss.__call__` (see
`keras_kd.losses`), or of the caller in a custom training loop.

Conventions shared by all functions:

- `y_true` is the target (the teacher), `y_pred` the prediction (the
  student). Inputs are logits by default (`from_logits=True`); with
  `from_logits=False` they are probabilities, which are turned into
  log-probabilities once and then treated exactly like logits.
- Everything is computed in log space from logits, with the row maximum
  subtracted before the temperature divides: results agree with a float64
  computation on the same inputs to float32 rounding (relative 1e-5) for
  any finite logits, however confident (tested up to 1e4). Nothing is
  clipped.
- Entries equal to `-inf` (masked logits, or zero probabilities) carry no
  mass: they contribute exactly 0 and give finite gradients, and a row whose
  entries are all `-inf` contributes 0. As in the math, a KL term is `+inf`
  where the target has mass and the prediction has none.
- `temperature` divides the logits and multiplies the divergence by
  `temperature**2` (Hinton et al., 2015), so gradient magnitudes do not
  shrink as the temperature grows.
- float16 and bfloat16 inputs are computed in float32.
"""

import math
import numbers

import keras
from keras import ops

__all__ = [
    "binary_symmetric_kl_divergence",
    "cross_entropy",
    "entropy",
    "global_pointer_kl_divergence",
    "jensen_shannon_divergence",
    "kl_divergence",
    "log_probabilities",
    "multilabel_categorical_crossentropy",
    "paired_symmetric_kl_divergence",
    "sparse_multilabel_categorical_crossentropy",
    "symmetric_kl_divergence",
]


# ---------------------------------------------------------------- validation


def validate_temperature(temperature):
    """Returns `temperature` as a float, or raises a `ValueError`.

    Python and NumPy numbers must be finite and `> 0`. Tensors and
    `keras.Variable`s (a temperature schedule) pass through unchecked: their
    value is only known when the loss runs.
    """
    if _is_tensor_like(temperature):
        return temperature
    if not _is_real(temperature) or not (
        math.isfinite(temperature) and temperature > 0
    ):
        raise ValueError(
            "Invalid value for argument `temperature`. Expected a finite "
            f"number > 0. Received: temperature={temperature}"
        )
    return float(temperature)


def _is_real(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_tensor_like(x):
    if isinstance(x, keras.Variable):
        return True
    return not _is_real(x) and hasattr(x, "shape") and hasattr(x, "dtype")


def _check_same_shape(y_true, y_pred, true_name="y_true", pred_name="y_pred"):
    a, b = tuple(y_true.shape), tuple(y_pred.shape)
    compatible = len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )
    if not compatible:
        raise ValueError(
            f"Arguments `{true_name}` and `{pred_name}` must have the same "
            f"shape. Received: {true_name}.shape={a}, {pred_name}.shape={b}"
        )


def _as_float(x):
    """Converts to a float tensor, computing half precision in float32."""
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    if dtype not in ("float32", "float64"):
        x = ops.cast(x, "float32")
    return x


def _pair(y_true, y_pred):
    y_true, y_pred = _as_float(y_true), _as_float(y_pred)
    _check_same_shape(y_true, y_pred)
    dtype = keras.backend.result_type(y_true.dtype, y_pred.dtype)
    return ops.cast(y_true, dtype), ops.cast(y_pred, dtype)


def _scale(x, temperature):
    if isinstance(temperature, float) and temperature == 1.0:
        return x
    return x / ops.cast(temperature, x.dtype)


def _times_t_squared(value, temperature):
    if isinstance(temperature, float) and temperature == 1.0:
        return value
    t = ops.cast(temperature, value.dtype)
    return value * t * t


# ------------------------------------------------------------ log space core


def log_probabilities(x, from_logits=True, temperature=1.0, axis=-1):
    """Normalized log-probabilities of logits or probabilities.

    `-inf` entries (masked logits, zero probabilities) stay `-inf`; a row
    whose entries are all `-inf` gives a row of `-inf` without NaN.

    Args:
        x: logits (`from_logits=True`) or probabilities.
        from_logits: whether `x` holds logits.
        temperature: the logits (or log-probabilities) are divided by it.
        axis: the class axis.

    Returns:
        `log_softmax(x / temperature)` along `axis`, same shape as `x`.
    """
    temperature = validate_temperature(temperature)
    x = _as_float(x)
    if not from_logits:
        x = _safe_log(x)
    return _log_softmax(x, axis, temperature)


def _safe_log(p):
    # log(0) = -inf by intent (no mass), without warnings or NaN gradients.
    positive = p > 0
    return ops.where(positive, ops.log(ops.where(positive, p, 1.0)), -math.inf)


def _log_softmax(x, axis, temperature=1.0):
    # -inf is swapped for the dtype's lowest finite value before
    # normalizing: exp() of it still underflows to exactly 0, but a fully
    # masked row no longer computes -inf - (-inf) = NaN.
    masked = x == -math.inf
    safe = ops.where(masked, _lowest(x.dtype), x)
    # The row maximum is subtracted before the temperature divides and
    # before normalizing, so that log-probabilities are accurate to float32
    # rounding of the result itself: `x / T - logsumexp(x / T)` would round
    # at the magnitude of x (1e-3 absolute for logits near 1e4).
    top = ops.max(safe, axis=axis, keepdims=True)
    shifted = _scale(safe - ops.stop_gradient(top), temperature)
    total = ops.sum(ops.exp(shifted), axis=axis, keepdims=True)
    log_p = shifted - ops.log(total)
    return ops.where(masked, -math.inf, log_p)


def _lowest(dtype):
    if keras.backend.standardize_dtype(dtype) == "float64":
        return -1.7976931348623157e308
    return -3.4028234663852886e38


def _plogp_ratio(log_p, log_q):
    """`p * (log p - log q)` elementwise, with `0 * log 0 = 0`.

    Where `p == 0` the term is 0 whatever `q` is; the masked branch never sees
    an infinity, so gradients stay finite.
    """
    has_mass = log_p > -math.inf
    log_p_safe = ops.where(has_mass, log_p, 0.0)
    log_q_safe = ops.where(has_mass, log_q, 0.0)
    term = ops.exp(log_p_safe) * (log_p_safe - log_q_safe)
    return ops.where(has_mass, term, 0.0)


def _plogq(log_p, log_q):
    """`p * log q` elementwise, with the term 0 wherever `p == 0`."""
    has_mass = log_p > -math.inf
    log_p_safe = ops.where(has_mass, log_p, 0.0)
    log_q_safe = ops.where(has_mass, log_q, 0.0)
    return ops.where(has_mass, ops.exp(log_p_safe) * log_q_safe, 0.0)


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
    log_p = log_probabilities(y_true, from_logits, temperature, axis)
    log_q = log_probabilities(y_pred, from_logits, temperature, axis)
    value = ops.sum(_plogp_ratio(log_p, log_q), axis=axis)
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


def validate_beta(beta):
    """Returns `beta` as a float, or raises a `ValueError`."""
    if not _is_real(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(
            "Invalid value for argument `beta`. Expected a number in "
            f"[0, 1]. Received: beta={beta}"
        )
    return float(beta)


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


# ------------------------------------------------- multi-label (sigmoid) head


def binary_symmetric_kl_divergence(y_true, y_pred, temperature=1.0):
    """Elementwise symmetric KL of the two-class distributions
    `[sigmoid(x), 1 - sigmoid(x)]`, with no reduction.

    Formula:

    ```
    d = T**2 * (sigmoid(s / T) - sigmoid(t / T)) * (s - t) / T
    ```

    Computed without cancellation or overflow. With `u >= v` the larger and
    smaller of `|s|, |t|` and `d = |s - t|` (each divided by `T`):

    ```
    sigmoid(s) - sigmoid(t) = -expm1(-d) * exp(-w) / ((1 + e^-u) (1 + e^-v))
    ```

    where `w = v` if `s` and `t` have the same sign and `w = 0` otherwise.
    Every exponential lies in `[0, 1]` and no large logits are added or
    subtracted, so values and gradients stay finite and accurate for logits
    of any size, including the `-1e12` GlobalPointer uses for masked spans.
    Entries that are `-inf` in either input are masked: they contribute 0.

    Args:
        y_true: logits `t`.
        y_pred: logits `s`, same shape.
        temperature: softening temperature `T > 0`.

    Returns:
        The elementwise divergence, same shape as the inputs.
    """
    temperature = validate_temperature(temperature)
    t, s = _pair(y_true, y_pred)
    masked = ops.logical_or(s == -math.inf, t == -math.inf)
    s = ops.where(masked, 0.0, s)
    t = ops.where(masked, 0.0, t)
    d = _scale(ops.abs(s - t), temperature)
    u = _scale(ops.maximum(ops.abs(s), ops.abs(t)), temperature)
    v = _scale(ops.minimum(ops.abs(s), ops.abs(t)), temperature)
    w = ops.where(ops.equal(s > 0, t > 0), v, 0.0)
    normalizer = (1.0 + ops.exp(-u)) * (1.0 + ops.exp(-v))
    gap = -ops.expm1(-d) * ops.exp(-w) / normalizer
    value = ops.where(masked, 0.0, d * gap)
    return _times_t_squared(value, temperature)


def global_pointer_kl_divergence(y_true, y_pred, temperature=1.0, axis=None):
    """Symmetric "KL" divergence of multi-label (GlobalPointer) logits.

    GlobalPointer logits mark positives by `> 0`; they are not a softmax
    distribution. The softmax of the symmetric KL is replaced by a sigmoid:

    ```
    D(s, t) = T**2 * sum((sigmoid(s/T) - sigmoid(t/T)) * (s/T - t/T))
    ```

    which equals the summed symmetric KL of the per-entry two-class
    distributions `[sigmoid(x), 1 - sigmoid(x)]` (Su, 2022). Masked entries
    (`-inf`, or large negative values in both inputs, as GlobalPointer uses
    for padding and the lower triangle) contribute exactly 0.

    Args:
        y_true: target logits `t`, e.g. `[batch, heads, length, length]`.
        y_pred: predicted logits `s`, same shape.
        temperature: softening temperature `T > 0`.
        axis: the axes of one label set, summed away. `None` means the
            `length x length` grid, `(-2, -1)`, for inputs of rank 4 and the
            last axis otherwise.

    Returns:
        The divergence with `axis` removed: `[batch, heads]` for
        GlobalPointer logits.

    Reference:
        Su. GlobalPointer下的"KL散度"应该是怎样的? 2022.
        https://spaces.ac.cn/archives/9039
    """
    elementwise = binary_symmetric_kl_divergence(y_true, y_pred, temperature)
    return ops.sum(elementwise, axis=_label_axes(elementwise, axis))


def _label_axes(x, axis):
    if axis is not None:
        return axis
    return (-2, -1) if len(x.shape) == 4 else -1


def multilabel_categorical_crossentropy(y_true, y_pred, axis=None):
    """Multi-label categorical crossentropy of logits against 0/1 labels.

    The "softmax + cross-entropy" generalized to any number of positives,
    the training loss of GlobalPointer heads:

    ```
    loss = log(1 + sum_{neg} exp(s_i)) + log(1 + sum_{pos} exp(-s_j))
    ```

    Each positive is pushed above 0 and each negative below 0. Entries whose
    logit is `-inf` (masked) contribute nothing, even if labelled positive.

    Args:
        y_true: 0/1 labels, same shape as `y_pred`.
        y_pred: logits.
        axis: the axes of one label set, summed over. `None` means `(-2, -1)`
            (the `length x length` span grid) for rank-4 GlobalPointer
            logits and the last axis otherwise.

    Returns:
        The loss with `axis` removed: `[batch, heads]` for GlobalPointer
        logits, `[batch]` for `[batch, classes]`.

    Reference:
        Su. 将"Softmax+交叉熵"推广到多标签分类问题. 2020.
        https://spaces.ac.cn/archives/7359
    """
    y_true, y_pred = _pair(y_true, y_pred)
    axis = _label_axes(y_pred, axis)
    positive = y_true > 0.5
    usable = y_pred > -math.inf
    logits = ops.where(usable, y_pred, 0.0)
    # A masked entry is excluded from both sums, whatever its label.
    neg = ops.where(ops.logical_and(usable, ~positive), logits, -math.inf)
    pos = ops.where(ops.logical_and(usable, positive), -logits, -math.inf)
    return _log1p_sum_exp(neg, axis) + _log1p_sum_exp(pos, axis)


def _log1p_sum_exp(x, axis):
    """`log(1 + sum(exp(x)))` over `axis`, stable, `-inf` entries ignored."""
    if isinstance(axis, int):
        axis = (axis,)
    top = ops.max(x, axis=axis, keepdims=True)
    # Shift by max(top, 0) so that no exp() overflows; a set with no finite
    # entry (all masked) shifts by 0. The shift is a constant: the value
    # does not depend on it, and its gradient must not either.
    high = ops.stop_gradient(
        ops.maximum(ops.where(top > -math.inf, top, 0.0), 0.0)
    )
    total = ops.squeeze(
        ops.sum(ops.exp(x - high), axis=axis, keepdims=True), axis=axis
    )
    high = ops.squeeze(high, axis=axis)
    # Unshifted, log1p keeps the digits of a small sum (a well-trained
    # model's loss); shifted, the sum is >= 1 and log is exact.
    shifted = high + ops.log(total + ops.exp(-high))
    return ops.where(high > 0, shifted, ops.log1p(total))


def sparse_multilabel_categorical_crossentropy(y_true, y_pred, mask_zero=False):
    """Multi-label categorical crossentropy with sparse positive labels.

    Same value as `multilabel_categorical_crossentropy`, but the positives
    come as integer indices into the last axis instead of a dense 0/1
    tensor. For GlobalPointer spans the labels then take memory linear in
    the number of entities instead of `length**2` per head, which is what
    matters for a data pipeline. Inside the loss the positives are scattered
    into a boolean mask the size of the logits (no larger than the logits
    themselves), so the value is exact; the common shortcut
    `log(sum_all - sum_pos)` cancels catastrophically once the positives
    hold most of the mass, i.e. for a well-trained model.

    Args:
        y_true: int tensor `[..., num_positives]` of indices into the last
            axis of `y_pred` (for GlobalPointer, flatten the span grid:
            index `start * length + end`). Padding entries are `-1`, or `0`
            when `mask_zero=True` (then index 0 cannot be a positive).
            Repeated indices count once.
        y_pred: logits `[..., num_classes]` (for GlobalPointer, reshape
            `[batch, heads, length, length]` to `[batch, heads, length**2]`).
        mask_zero: whether index 0 marks padding.

    Returns:
        The loss `[...]` (the class axis removed).
    """
    y_pred = _as_float(y_pred)
    positive = _positives_mask(y_true, y_pred, mask_zero)
    return multilabel_categorical_crossentropy(
        ops.cast(positive, y_pred.dtype), y_pred, axis=-1
    )


def _positives_mask(indices, logits, mask_zero):
    """Scatters sparse positive indices into a boolean mask like `logits`."""
    indices = ops.cast(ops.convert_to_tensor(indices), "int32")
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError(
            "The last axis of `y_pred` must have a static size. Received: "
            f"y_pred.shape={tuple(logits.shape)}"
        )
    if tuple(indices.shape[:-1]) != tuple(logits.shape[:-1]) and None not in (
        tuple(indices.shape[:-1]) + tuple(logits.shape[:-1])
    ):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must agree on all axes but the "
            f"last. Received: y_true.shape={tuple(indices.shape)}, "
            f"y_pred.shape={tuple(logits.shape)}"
        )
    valid = indices > 0 if mask_zero else indices >= 0
    # Padding goes to an extra column that is dropped afterwards.
    columns = ops.where(valid, indices, num_classes)
    columns = ops.reshape(columns, (-1, indices.shape[-1]))
    rows = ops.shape(columns)[0]
    row_ids = ops.broadcast_to(
        ops.expand_dims(ops.arange(rows, dtype="int32"), -1),
        ops.shape(columns),
    )
    coordinates = ops.reshape(ops.stack([row_ids, columns], axis=-1), (-1, 2))
    counts = ops.scatter(
        coordinates,
        ops.ones((ops.shape(coordinates)[0],), dtype="int32"),
        (rows, num_classes + 1),
    )
    mask = counts[:, :num_classes] > 0
    return ops.reshape(mask, ops.shape(logits))


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
