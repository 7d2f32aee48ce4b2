"""Shared pieces of `keras_kd.ops`: argument checks, dtype handling and
the log-space primitives every divergence is built from."""

import math
import numbers

import keras
from keras import ops

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


def validate_beta(beta):
    """Returns `beta` as a float, or raises a `ValueError`."""
    if not _is_real(beta) or not 0.0 <= beta <= 1.0:
        raise ValueError(
            "Invalid value for argument `beta`. Expected a number in "
            f"[0, 1]. Received: beta={beta}"
        )
    return float(beta)


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
    if isinstance(axis, int):
        # One fused kernel per backend instead of exp, sum, log, subtract:
        # the same value, a fraction of the eager-mode overhead on torch.
        log_p = ops.log_softmax(shifted, axis=axis)
    else:
        total = ops.sum(ops.exp(shifted), axis=axis, keepdims=True)
        log_p = shifted - ops.log(total)
    return ops.where(masked, -math.inf, log_p)


def finite_log_probabilities(x, from_logits=True, temperature=1.0, axis=-1):
    """Like `log_probabilities`, but masked entries get a finite log.

    A masked entry (`-inf` logit, zero probability) gets about the dtype's
    lowest finite value instead of `-inf`, so `exp()` of it is exactly 0
    and `p * (log p - log q)` needs no `where` to give 0 there: divergences
    built on this run fewer kernels, with the same values and gradients.
    Not for display: read such entries as "no mass", not as numbers.
    """
    temperature = validate_temperature(temperature)
    x = _as_float(x)
    if not from_logits:
        x = _safe_log(x)
    if isinstance(temperature, float) and temperature == 1.0:
        # Nothing to divide: the fused log_softmax shifts by itself.
        shifted = x
    else:
        top = ops.max(x, axis=axis, keepdims=True)
        # Only the small [..., 1] tensor needs a guard: a fully masked row
        # would otherwise compute -inf - (-inf).
        top = ops.where(top > -math.inf, top, 0.0)
        # Shift before dividing by T, as in `_log_softmax`, for accuracy at
        # large logits.
        shifted = _scale(x - ops.stop_gradient(top), temperature)
    # The clamp turns -inf (and an overflow of lowest / T) into a finite
    # value whose gradient is 0.
    shifted = ops.maximum(shifted, _lowest(x.dtype))
    if isinstance(axis, int):
        return ops.log_softmax(shifted, axis=axis)
    total = ops.sum(ops.exp(shifted), axis=axis, keepdims=True)
    return shifted - ops.log(total)


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
