"""The driver of the softmax divergences: from two arrays of logits to a
differentiable per-row value, through the terms of `_softmax_terms.py`.

Three ways through, one set of formulas:

- the whole array at once, on the guarded path (`_log_ratio.softmax_pair`)
  or, in eager torch, first on the unguarded one (`_optimistic_pair`);
- the same as one `torch.compile`d graph (`_compiled_terms`) where
  compiling is on;
- half-precision logits on torch and JAX, a block of rows at a time
  (`_half_logits.py`), each block through one of the two above.
"""

import math

import keras
from keras import ops

from keras_kd.ops import _half_logits
from keras_kd.ops import _log_ratio as lr
from keras_kd.ops._core import _log_softmax, _reduce_max, dtype_of
from keras_kd.ops._gradients import torch_eager, with_gradient
from keras_kd.ops._softmax_terms import TERMS, _expand, _log_mixture
from keras_kd.ops._torch_compile import maybe_compiled, torch_compile_enabled


def _squeeze(x, axis):
    return ops.squeeze(x, axis=axis)


def _plain_scaled(x, temperature, axis):
    """`x / T` with at most one rounding per entry of the differences
    that matter: exact for a power of two, else after subtracting the row
    maximum (for logits near 1e4, `x / T` alone loses 1e-4). A tensor
    temperature (a `keras.Variable` under a scheduler) is not known here,
    so it takes the general form."""
    if not isinstance(temperature, float):
        top = ops.stop_gradient(_reduce_max(x, axis))
        return (x - top) / ops.cast(temperature, x.dtype)
    if temperature == 1.0:
        return x
    if math.frexp(temperature)[0] == 0.5:
        return x * (1.0 / temperature)
    top = ops.stop_gradient(_reduce_max(x, axis))
    return (x - top) * (1.0 / temperature)


def _optimistic_pair(t, s, temperature, axis):
    """torch's fast path: plain `log_softmax`, no guard for `-inf`, NaN or
    logits near the float limit. Every such input makes the value
    non-finite, which the caller checks (one host sync on a row vector)
    before trusting it; each guard would otherwise be a pass over memory.
    """
    log_p = ops.log_softmax(_plain_scaled(t, temperature, axis), axis=axis)
    log_q = ops.log_softmax(_plain_scaled(s, temperature, axis), axis=axis)
    return lr.Pair(log_p, log_q, axis)


def _evaluate(static, t, s, temp):
    """`(value, grads)`: the value per row with `axis` removed, times
    `T**2`, and `grads()` returning the unscaled gradients with respect to
    `a = s / T` and `b = t / T` (`b`'s `None` without `teacher_grad`).

    In eager torch the unguarded path goes first and is kept when its
    value is finite; the guarded path otherwise, and always elsewhere.
    """
    kind, axis, precise, beta, teacher_grad, frugal = static
    terms = TERMS[kind]
    extra = () if beta is None else (beta,)
    found = None
    if isinstance(axis, int) and torch_eager():
        pair = _optimistic_pair(t, s, temp, axis)
        if precise:
            lr.optimistic_precise(pair, t, s, temp, axis)
        pair.frugal = frugal
        found = terms(pair, *extra, teacher_grad)
        del pair
        if not bool(ops.all(ops.isfinite(found[0]))):
            found = None
    if found is None:
        pair = lr.softmax_pair(t, s, temp, axis, precise)
        pair.frugal = frugal
        found = terms(pair, *extra, teacher_grad)
    value, grads = found
    return _squeeze(value, axis) * (temp * temp), grads


def softmax_divergence(kind, t, s, temperature, axis, precise, beta=None):
    """`T**2 * D(softmax(t / T), softmax(s / T))` per row, with its
    closed-form gradient.

    Args:
        kind: `"kl"`, `"symmetric_kl"` or `"jsd"` (then `0 < beta < 1`).
        t, s: teacher and student logits, same shape and float dtype (half
            precision only where `_half_logits.keeps_half` allows it).
        temperature: a validated temperature (float or scalar tensor).
        axis: the class axis (int or tuple), summed away.
        precise: whether to use the precise path.
        beta: the JSD mixing weight.

    Returns:
        The divergence with `axis` removed (float32 for half precision).
    """
    constant = isinstance(temperature, float)
    half = dtype_of(t) in _half_logits.HALF
    math_dtype = "float32" if half else dtype_of(t)
    constants = () if constant else (ops.cast(temperature, math_dtype),)
    ndim = len(t.shape)

    def forward(t, s, *temp, eager):
        temp = temperature if constant else temp[0]
        teacher_grad = not eager or bool(getattr(t, "requires_grad", True))
        static = (kind, axis, precise, beta, teacher_grad)
        if half:
            return _half_forward(static, t, s, temp)
        if torch_compile_enabled():
            value, grad_a, grad_b = maybe_compiled(_compiled_terms)(
                static + (eager,),
                ops.stop_gradient(t),
                ops.stop_gradient(s),
                ops.convert_to_tensor(temp, t.dtype),
            )
            return value, _scaled(lambda: (grad_a, grad_b), axis, ndim, temp)
        value, grads = _evaluate(static + (eager,), t, s, temp)
        if eager:
            computed = grads()  # now, so that the pieces can be freed
            grads = lambda: computed  # noqa: E731
        return value, _scaled(grads, axis, ndim, temp)

    def reference(t, s, *temp):
        temp = temperature if constant else temp[0]
        t, s = ops.cast(t, math_dtype), ops.cast(s, math_dtype)
        return reference_divergence(kind, t, s, temp, axis, beta)

    return with_gradient(forward, reference, (t, s), constants)


def _scaled(grads, axis, ndim, temp):
    """`grads()` scaled by upstream and `temp`, teacher's first."""

    def scaled_grads(upstream):
        up = _expand(upstream, axis, ndim) * temp
        grad_a, grad_b = grads()
        return grad_b if grad_b is None else grad_b * up, grad_a * up

    return scaled_grads


def _compiled_terms(static, t, s, temp):
    """`(value, grad_a, grad_b)` in one graph for torch.compile: a pure
    function of tensors and the hashable `static`, with no host read
    (`torch_eager` is false while torch.compile traces)."""
    gradients = static[-1]
    value, grads = _evaluate(static[:-1] + (True,), t, s, temp)
    if not gradients:
        return value, None, None
    grad_a, grad_b = grads()
    return value, grad_a, grad_b


def _half_forward(static, t, s, temp):
    """`(value, grads)` of half-precision logits, a block of rows at a
    time (see `_half_logits`); `grads(upstream)` recomputes each block."""
    shape = tuple(t.shape)
    classes = shape[-1]
    t_rows, s_rows = (ops.reshape(x, (-1, classes)) for x in (t, s))
    size = _half_logits.rows_per_block(classes)
    block = maybe_compiled(_half_block)

    def values(t_block, s_block):
        return block(static, t_block, s_block, temp, None)[:1]

    (value,) = _half_logits.over_row_blocks(
        values, (t_rows, s_rows), [((), "float32")], size
    )

    def grads(upstream):
        dtype = dtype_of(t)
        teacher = ((classes,), dtype) if static[-1] else None
        up = ops.reshape(ops.cast(upstream, "float32"), (-1,))
        grad_a, grad_b = _half_logits.over_row_blocks(
            lambda *rows: block(static, *rows[:2], temp, rows[2])[1:],
            (t_rows, s_rows, up),
            [((classes,), dtype), teacher],
            size,
        )
        if grad_b is not None:
            grad_b = ops.reshape(grad_b, shape)
        return grad_b, ops.reshape(grad_a, shape)

    return ops.reshape(value, shape[:-1]), grads


def _half_block(static, t, s, temp, upstream):
    """`(value, grad_a, grad_b)` of one block of half-precision rows: the
    math in float32, the gradients (given `upstream`, per row) times
    `upstream * T` and rounded once to the logits' dtype. Compiled by
    torch.compile as one graph where compiling is on."""
    kind, axis, precise, beta, teacher_grad = static
    dtype = dtype_of(t)
    gradients = upstream is not None
    teacher_grad = teacher_grad and gradients
    t, s = ops.cast(t, "float32"), ops.cast(s, "float32")
    # Each piece freed once used: a pass over memory each on torch.
    frugal = keras.backend.backend() == "torch"
    value, grads = _evaluate(
        (kind, -1, precise, beta, teacher_grad, frugal), t, s, temp
    )
    if not gradients:
        return value, None, None
    grad_a, grad_b = grads()
    factor = ops.expand_dims(upstream, -1) * temp
    grad_a = ops.cast(grad_a * factor, dtype)
    if grad_b is not None:
        grad_b = ops.cast(grad_b * factor, dtype)
    return value, grad_a, grad_b


def reference_divergence(kind, t, s, temperature, axis, beta=None):
    """The plain formula on the log-softmax engine, differentiable by
    autodiff (the second-order fallback on torch)."""
    log_p = _log_softmax(t, axis, temperature)
    log_q = _log_softmax(s, axis, temperature)
    p, q = ops.exp(log_p), ops.exp(log_q)
    if kind == "kl":
        value = ops.sum(p * (log_p - log_q), axis=axis)
    elif kind == "symmetric_kl":
        value = ops.sum((p - q) * (log_p - log_q), axis=axis)
    else:
        log_m = _log_mixture(log_p, log_q, beta)
        value = beta * ops.sum(p * (log_p - log_m), axis=axis) + (
            1.0 - beta
        ) * ops.sum(q * (log_q - log_m), axis=axis)
    if isinstance(temperature, float):
        return value * (temperature * temperature)
    return value * ops.cast(temperature, value.dtype) ** 2
