"""The GlobalPointer (multi-label, sigmoid) symmetric "KL" divergence, with
its closed-form gradient, on the fast and the precise path."""

import math

from keras import ops

from keras_kd.ops._core import _pair, validate_temperature
from keras_kd.ops._gradients import resolve_precise, torch_eager, with_gradient
from keras_kd.ops._rowdot import rowdot
from keras_kd.ops._softmax_terms import _expand


def binary_symmetric_kl_divergence(
    y_true, y_pred, temperature=1.0, precise=None
):
    """Elementwise symmetric KL of the two-class distributions
    `[sigmoid(x), 1 - sigmoid(x)]`, with no reduction.

    Formula:

    ```
    d = T**2 * (sigmoid(s / T) - sigmoid(t / T)) * (s - t) / T
    ```

    Every entry is non-negative (`sigmoid` is increasing). The fast path
    computes exactly this formula: each entry is off by float32 rounding of
    the two sigmoids and of `s / T - t / T`, about `1e-7 * T**2 * |s - t| /
    T` absolute, which is a large relative error where both sigmoids
    saturate on the same side or nearly agree. The precise path takes
    `s - t` before dividing by `T` and the sigmoid difference through

    ```
    sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * -expm1(b - a)
    ```

    for `a >= b` (and with `a`, `b` swapped otherwise), so that nothing
    cancels: a relative 1e-5 for logits of any size, also when student and
    teacher nearly agree and at `T = 1000`. Entries that are `-inf` in
    either input are masked:
    they contribute 0 (gradient 0), unless the other input is NaN there (a
    NaN always gives NaN). GlobalPointer's `-1e12` masks need nothing.

    Gradient (closed form): `d/ds = T * (sigmoid'(s / T) * (s - t) / T +
    sigmoid(s / T) - sigmoid(t / T))`, and the mirror image for `t`.

    Args:
        y_true: logits `t`.
        y_pred: logits `s`, same shape.
        temperature: softening temperature `T > 0`.
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`.

    Returns:
        The elementwise divergence, same shape as the inputs.
    """
    return _sigmoid_divergence(y_true, y_pred, temperature, None, precise)


def global_pointer_kl_divergence(
    y_true, y_pred, temperature=1.0, axis=None, precise=None
):
    """Symmetric "KL" divergence of multi-label (GlobalPointer) logits.

    GlobalPointer logits mark positives by `> 0`; they are not a softmax
    distribution. The softmax of the symmetric KL is replaced by a sigmoid:

    ```
    D(s, t) = T**2 * sum((sigmoid(s/T) - sigmoid(t/T)) * (s/T - t/T))
    ```

    which equals the summed symmetric KL of the per-entry two-class
    distributions `[sigmoid(x), 1 - sigmoid(x)]` (Su, 2022). Masked entries
    (`-inf`, or large negative values in both inputs, as GlobalPointer uses
    for padding and the lower triangle) contribute exactly 0. See
    `binary_symmetric_kl_divergence` for the two paths and the gradient.

    Args:
        y_true: target logits `t`, e.g. `[batch, heads, length, length]`.
        y_pred: predicted logits `s`, same shape.
        temperature: softening temperature `T > 0`.
        axis: the axes of one label set, summed away. `None` means the
            `length x length` grid, `(-2, -1)`, for inputs of rank 4 and the
            last axis otherwise.
        precise: `None` (the fast path, on every backend and device
            measured),
            `True` or `False`.

    Returns:
        The divergence with `axis` removed: `[batch, heads]` for
        GlobalPointer logits.

    Reference:
        Su. GlobalPointer下的"KL散度"应该是怎样的? 2022.
        https://spaces.ac.cn/archives/9039
    """
    t = ops.convert_to_tensor(y_true)
    if axis is None:
        axis = (-2, -1) if len(t.shape) == 4 else -1
    return _sigmoid_divergence(y_true, y_pred, temperature, axis, precise)


def _sigmoid_divergence(y_true, y_pred, temperature, axis, precise):
    temperature = validate_temperature(temperature)
    precise = resolve_precise(precise)
    t, s = _pair(y_true, y_pred)
    constant = isinstance(temperature, float)
    constants = () if constant else (ops.cast(temperature, t.dtype),)
    ndim = len(t.shape)

    def forward(t, s, *temp, eager):
        temp = temperature if constant else temp[0]
        teacher_grad = not eager or bool(getattr(t, "requires_grad", True))
        found = None
        if not precise and torch_eager():
            # Unguarded: a `-inf` (or NaN) makes the value non-finite, and
            # only then are the guards paid for.
            found = _terms(t, s, temp, False, None, teacher_grad, axis)
            if not bool(ops.all(ops.isfinite(found[0]))):
                found = None
        if found is None:
            masked = _masked_entries(t, s)
            t = ops.where(masked, 0.0, t)
            s = ops.where(masked, 0.0, s)
            found = _terms(t, s, temp, precise, masked, teacher_grad, axis)
        value, grads = found
        del found
        value = value * (temp * temp)
        if eager:
            computed = grads()
            grads = lambda: computed  # noqa: E731

        def scaled_grads(upstream):
            if axis is not None:
                upstream = _expand(upstream, axis, ndim)
            up = upstream * temp
            grad_s, grad_t = grads()
            return None if grad_t is None else grad_t * up, grad_s * up

        return value, scaled_grads

    def reference(t, s, *temp):
        temp = temperature if constant else temp[0]
        return _reduce(_reference(t, s, temp), axis)

    return with_gradient(forward, reference, (t, s), constants)


def _reduce(x, axis):
    return x if axis is None else ops.sum(x, axis=axis)


def _row_dot(x, y, axis):
    """`sum(x * y, axis)` by `rowdot` (the label axes flattened: views)."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    ndim = len(x.shape)
    axes = sorted(a % ndim for a in axes)
    # (An empty batch cannot be reshaped with -1.)
    if axes != list(range(ndim - len(axes), ndim)) or 0 in tuple(x.shape):
        return ops.sum(x * y, axis=axis)
    lead = tuple(x.shape[: ndim - len(axes)])
    x, y = ops.reshape(x, lead + (-1,)), ops.reshape(y, lead + (-1,))
    return ops.squeeze(rowdot(x, y, -1), axis=-1)


def _masked_entries(t, s):
    # `s + t` is NaN where either is NaN (or they are opposite infinities).
    return ops.logical_and(
        ops.logical_or(s == -math.inf, t == -math.inf),
        ops.logical_not(ops.isnan(s + t)),
    )


def _scaled(x, temperature):
    if isinstance(temperature, float):
        return x if temperature == 1.0 else x * (1.0 / temperature)
    return x / temperature


def _terms(t, s, temperature, precise, masked, teacher_grad, axis):
    """`(value, grads)`, without the `T**2` factor, summed over `axis`
    (elementwise for `None`); `grads()` returns the gradients with respect
    to `s / T` and `t / T`."""
    a, b = _scaled(s, temperature), _scaled(t, temperature)
    sig_a, sig_b = ops.sigmoid(a), ops.sigmoid(b)
    if precise:
        # The difference first (in halves: no overflow), then one division.
        delta = _scaled(s * 0.5 - t * 0.5, temperature) * 2.0
        # 1 - sigmoid(x) as sigmoid(-x): no cancellation where x >> 0.
        low_a, low_b = ops.sigmoid(-a), ops.sigmoid(-b)
        shrink = -ops.expm1(-ops.abs(delta))  # in [0, 1]: no overflow
        gap = ops.where(
            delta >= 0.0, sig_a * low_b * shrink, -(sig_b * low_a * shrink)
        )
    else:
        delta = a - b
        gap = sig_a - sig_b
        low_a = low_b = None
    if masked is None and axis is not None:
        # torch's unguarded path: a row dot, no product in memory.
        value = _row_dot(gap, delta, axis)
    else:
        # Masked entries were zeroed on both sides: their gap, delta and
        # gradients are exactly 0 without another `where`.
        value = _reduce(gap * delta, axis)

    def grads():
        # d/da gap * delta = sigmoid'(a) delta + gap.
        slope_a = sig_a * (1.0 - sig_a) if low_a is None else sig_a * low_a
        grad_s = slope_a * delta + gap
        grad_t = None
        if teacher_grad:
            slope_b = sig_b * (1.0 - sig_b) if low_b is None else sig_b * low_b
            grad_t = -(slope_b * delta + gap)
        return grad_s, grad_t

    return value, grads


def _reference(t, s, temperature):
    """The plain elementwise formula with masks, differentiable by autodiff
    (the second-order fallback on torch)."""
    masked = _masked_entries(t, s)
    t = _scaled(ops.where(masked, 0.0, t), temperature)
    s = _scaled(ops.where(masked, 0.0, s), temperature)
    value = (ops.sigmoid(s) - ops.sigmoid(t)) * (s - t)
    value = ops.where(masked, 0.0, value)
    if isinstance(temperature, float):
        return value * (temperature * temperature)
    return value * temperature * temperature
