"""Shared pieces of `keras_kd.ops`: argument checks, dtype handling and
the one log-softmax engine every divergence is built from."""

import math

import keras
from keras import ops

from keras_kd import _checks

# ---------------------------------------------------------------- validation


def validate_temperature(temperature):
    """Returns a checked temperature, or raises a `ValueError`.

    Python and NumPy numbers (and 0-d arrays) are checked by
    `keras_kd._checks.temperature` and returned as floats. A backend tensor
    (or a tracer under `jit`) and a `keras.Variable` pass through unchanged:
    inside a compiled function their value is only known when the loss runs
    and cannot be read here. A variable's value is checked where it is set
    (a loss constructor, the Distiller, the temperature callback).
    """
    if isinstance(temperature, keras.Variable) or ops.is_tensor(temperature):
        return temperature
    return _checks.temperature(temperature)


def validate_beta(beta):
    """Returns `beta` as a float in `[0, 1]`, or raises a `ValueError`."""
    return _checks.fraction("beta", beta)


def _weight(name, value):
    """A weight `>= 0`: numbers are checked, tensors and variables pass."""
    if isinstance(value, keras.Variable) or ops.is_tensor(value):
        return value
    return _checks.non_negative(name, value)


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


# ----------------------------------------------------------------- dtypes


def _as_float(x):
    """Converts to a float tensor, computing half precision in float32."""
    x = ops.convert_to_tensor(x)
    if dtype_of(x) not in ("float32", "float64"):
        x = ops.cast(x, "float32")
    return x


def dtype_of(x):
    """The standardized dtype name of a tensor: `"float32"`, `"int32"`..."""
    return keras.backend.standardize_dtype(x.dtype)


def compute_dtype(tensors):
    """The dtype the softmax math runs in: float64 if any of `tensors` is,
    else float32 (half precision included).

    Not `keras.backend.result_type`: off TensorFlow it maps float64 to
    float32, so float64 inputs would silently lose their precision."""
    return "float64" if "float64" in map(dtype_of, tensors) else "float32"


def matmul_dtype(hidden, dtype):
    """The dtype one model's products run in: that of its hidden states
    when they are half precision (what its `Dense` head computes in under
    a `bfloat16` or `mixed_bfloat16` policy, the kernel cast to it; what
    GPU matrix units are fast at), else the softmax math's `dtype`."""
    found = dtype_of(hidden)
    return found if found in ("bfloat16", "float16") else dtype


def _pair(y_true, y_pred):
    y_true, y_pred = _as_float(y_true), _as_float(y_pred)
    _check_same_shape(y_true, y_pred)
    dtype = compute_dtype((y_true, y_pred))
    return ops.cast(y_true, dtype), ops.cast(y_pred, dtype)


def _lowest(dtype):
    if keras.backend.standardize_dtype(dtype) == "float64":
        return -1.7976931348623157e308
    return -3.4028234663852886e38


def _constant(value, dtype):
    # A Python float given to `ops.where` becomes a float32 tensor on torch:
    # the float64 lowest value would turn into -inf there.
    return ops.convert_to_tensor(value, dtype=dtype)


def _scale(x, temperature):
    if isinstance(temperature, float):
        return x if temperature == 1.0 else x / temperature
    return x / ops.cast(temperature, x.dtype)


def _times_t_squared(value, temperature):
    if isinstance(temperature, float):
        return value if temperature == 1.0 else value * (temperature**2)
    t = ops.cast(temperature, value.dtype)
    return value * t * t


def _reduce_max(x, axis):
    """`ops.max(x, axis, keepdims=True)`, also for an empty batch.

    Keras' TensorFlow and torch backends raise on a tensor with a
    zero-length axis; the maximum over no entries is `-inf`.
    """
    if 0 in tuple(x.shape):
        return ops.sum(x, axis=axis, keepdims=True) - math.inf
    # `amax`, not `max`: the same value, and torch.compile traces it whole.
    return ops.amax(x, axis=axis, keepdims=True)


# ------------------------------------------------------------ log space core


def _logits_of(x, from_logits):
    """Logits as they are, or the log of probabilities.

    `log 0 = -inf` by intent (no mass), without a warning or a NaN gradient;
    a NaN probability stays NaN.
    """
    if from_logits:
        return x
    empty = x <= 0
    return ops.where(empty, -math.inf, ops.log(ops.where(empty, 1.0, x)))


def _log_softmax(x, axis=-1, temperature=1.0):
    """`log_softmax(x / temperature)`, finite: the one engine.

    Every divergence is built on this function, and `log_probabilities` is
    this function with one rule applied to its output.

    The rule: an entry with no mass (a `-inf` logit, a zero probability, a
    log-probability below the dtype's lowest finite value `L`, and every
    entry of a row whose logits are all `-inf`) comes out as exactly `L`.
    `exp(L)` is exactly 0, so a term `p * (log p - log q)` is exactly 0
    where `p` has no mass, and the difference of two logs stays finite
    (within `[L, -L]`): divergences need no `where` and give finite
    gradients. A NaN anywhere in a row makes the whole row NaN.

    The row maximum is subtracted before the temperature divides, so the
    log-probabilities are accurate to rounding of the result itself, not of
    the logits (`x / T - logsumexp(x / T)` loses 1e-3 absolute at logits near
    1e4). `x - max` can overflow for finite logits of opposite signs near the
    float maximum; at `T <= 1` the true value is then below `L` anyway, at
    `T > 1` the halves are subtracted and the factor 2 is folded into
    `1 / T`, so no intermediate overflows.

    A true log-probability below `L` (only for logit differences beyond
    the float maximum times `T`) is taken as `L`: it has no mass either way,
    but a divergence that weights it by another distribution's mass `w`
    reads `w * |L|` where the truth is up to `2 * w * |L|`. Carrying half
    log-probabilities would make that exact, at 1.5x the time of every
    divergence on torch; logits beyond 1e38 do not occur in training.

    Args:
        x: a float tensor of logits.
        axis: the class axis (an int or a tuple of ints).
        temperature: a validated temperature.

    Returns:
        Log-probabilities in `[L, 0]`, same shape and dtype as `x`.
    """
    return _log_softmax_parts(x, axis, temperature)[0]


def _log_softmax_parts(x, axis=-1, temperature=1.0, probabilities=False):
    """`(log_softmax(x / T), softmax(x / T), exps, total)` by the one
    engine (see `_log_softmax`); all but the first are `None` unless
    `probabilities=True`.

    The probabilities come as `exps / total`, `exps = exp(shifted)` being
    the exponentials the normalizer `total` needs anyway: under XLA one
    array instead of two, and no second `exp`. On torch `exps` and `total`
    are `None` (`log_softmax` is one kernel there, `softmax` its `exp`).
    """
    lowest = _lowest(x.dtype)
    top = _reduce_max(x, axis)
    empty = top == -math.inf
    # A fully masked row is shifted by 0; a NaN row keeps its NaN maximum.
    top = ops.stop_gradient(ops.where(empty, 0.0, top))
    if isinstance(temperature, float) and temperature <= 1.0:
        shifted = _scale(x - top, temperature)
    else:
        if isinstance(temperature, float):
            factor = 2.0 / temperature
        else:
            factor = 2.0 / ops.cast(temperature, x.dtype)
        shifted = (x * 0.5 - top * 0.5) * factor
    # -inf (masked, or beyond the float range) becomes L; NaN stays NaN.
    shifted = ops.where(shifted < lowest, _constant(lowest, x.dtype), shifted)
    if isinstance(axis, int) and keras.backend.backend() == "torch":
        # One kernel instead of exp, sum, log, subtract: in eager torch each
        # is a pass over memory. (Under XLA the plain form below fuses into
        # the reductions and the consumers; `log_softmax` there would
        # subtract the maximum a second time and keep a copy of the
        # logits.)
        log_p = ops.log_softmax(shifted, axis=axis)
        # A fully masked row came out uniform; adding L takes its mass away
        # (and adds -0.0, exactly nothing, to every other row).
        log_p = log_p + ops.cast(empty, x.dtype) * lowest
        p = ops.exp(log_p) if probabilities else None
        return log_p, p, None, None
    # The largest shifted entry is exactly 0, so the sum is >= 1 except in
    # a fully masked row, whose entries are already L.
    exps = ops.exp(shifted)
    total = ops.where(empty, 1.0, ops.sum(exps, axis=axis, keepdims=True))
    log_p = shifted - ops.log(total)
    if not probabilities:
        return log_p, None, None, None
    return log_p, exps / total, exps, total


def log_probabilities(x, from_logits=True, temperature=1.0, axis=-1):
    """Normalized log-probabilities of logits or probabilities.

    Entries with no mass (masked `-inf` logits, zero probabilities, and
    log-probabilities below the dtype's lowest finite value) are `-inf`; a
    row whose entries are all `-inf` gives a row of `-inf` without NaN. A
    NaN anywhere in a row makes the whole row NaN.

    Args:
        x: logits (`from_logits=True`) or probabilities.
        from_logits: whether `x` holds logits.
        temperature: the logits (or log-probabilities) are divided by it.
        axis: the class axis.

    Returns:
        `log_softmax(x / temperature)` along `axis`, same shape as `x`.
    """
    temperature = validate_temperature(temperature)
    log_p = _finite_log_probabilities(
        _as_float(x), from_logits, temperature, axis
    )
    return ops.where(log_p == _lowest(log_p.dtype), -math.inf, log_p)


def _finite_log_probabilities(x, from_logits, temperature, axis):
    """`_log_softmax` of logits or probabilities (no mass is exactly `L`)."""
    return _log_softmax(_logits_of(x, from_logits), axis, temperature)
