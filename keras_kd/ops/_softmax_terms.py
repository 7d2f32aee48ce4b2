"""Values and closed-form gradients of the softmax divergences (KL,
symmetric KL, generalized JSD) from a `Pair`; `_softmax_driver.py` turns
them into differentiable functions of the logits.

Each `*_terms(pair, ...)` returns `(value, grads)`: the divergence per row
(with the class axis kept, without the `T**2` factor) and a function
returning its gradients with respect to `a = s / T` and `b = t / T`. The
driver multiplies them by `T**2` and by `T` (`d/ds = (1 / T) d/da`).

Gradients (per row; `E_Q`, `E_P` expectations):

```
KL(P || Q):     d/da = Q - P                  d/db = P (u - KL)
sym. KL:        d/da = Q (E_Q[u] - u) - (P - Q)
                d/db = P (u - E_P[u]) + (P - Q)
JSD_beta:       d/da = (1 - beta) Q (E_Q[l] - l),   l = log(M / Q)
                d/db = beta P (x - E_P[x]),         x = log(P / M)
```

In a row where one distribution has no mass at all (every logit `-inf`)
the gradients are 0: nothing there can move.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_kd.ops import _log_ratio as lr
from keras_kd.ops._core import _constant, dtype_of
from keras_kd.ops._rowdot import rowdot, rowdot_difference


def _non_negative(x):
    # Rounding can leave a fast-path divergence a few ulp below 0; `where`
    # keeps NaN (a NaN row stays NaN).
    return ops.where(x < 0.0, 0.0, x)


def _torch_mass(pair, axis):
    """Per row, the total of torch's `exp(log_softmax)` that the precise
    KL carries as a factor: `Q`'s in a near row (every piece there comes
    from `Q`), `P`'s in any other (there `sum Q phi(u) = sum P u + sum Q
    - sum P`, and the normalizers' rounding in `u` cancels).

    torch's `log_softmax` underestimates a row's normalizer when many
    small terms meet a large running float32 sum: at 32000 classes of
    logits of scale 5 its probabilities sum to 1 + 3e-6, at 128256 to
    1 + 1e-5, a relative error of the KL beyond the float32 rounding
    (`F.kl_div` has it too, through `P`). `ops.sum` totals them
    accurately, and dividing by the total takes the factor out."""
    return ops.where(
        pair.near, lr.rowsum(pair.q, axis), lr.rowsum(pair.p, axis)
    )


def _spread(weight, x, mean):
    """`weight * (x - mean)` as a difference of products: where the weight
    is 0, `x` and `mean` may be near opposite float limits and their
    difference overflow (`0 * inf` is NaN)."""
    return weight * x - weight * mean


def _plain_spread(weight, x, mean):
    """`weight * (x - mean)` in two passes: for torch's unguarded path,
    where every log is finite and the value was checked."""
    return weight * (x - mean)


def _masked(x, rows):
    return x if rows is None else ops.where(rows, x, 0.0)


def kl_terms(pair, teacher_grad=True):
    axis = pair.axis
    if pair.precise:
        value = lr.rowsum(pair.q_phi(), axis)
        if keras.backend.backend() == "torch":
            value = value / _torch_mass(pair, axis)
    else:
        p = pair.p
        if keras.backend.backend() != "torch":
            # Fused under XLA; one sum rounds less than two that cancel.
            value = lr.rowsum(p * pair.u, axis)
        elif teacher_grad and pair.frugal:
            # The teacher's gradient, computed next, reads `u` anyway.
            value = rowdot(p, pair.u, axis)
        else:
            # `u` never whole in memory (see `rowdot_difference`).
            value = rowdot_difference(p, pair.log_p, pair.log_q, axis)
        value = _non_negative(value)
    if pair.precise and pair.empty_p is not None:
        # No target mass: nothing to match (the identities behind `q_phi`
        # assume P sums to 1); 0, or NaN if the student's row is NaN.
        total = pair.q_total
        nothing = (lr.rowsum(pair.q, axis) if total is None else total) * 0.0
        value = ops.where(pair.empty_p, nothing, value)

    if not teacher_grad:
        pair.release("log_p")

    def grads():
        if pair.precise:
            grad_a = -pair.p_minus_q()
        grad_b = None
        if teacher_grad:
            grad_b = _masked(_spread(pair.p, pair.u, value), pair.regular)
        if not pair.precise:
            pair.release("log_p", "u")
            q = pair.q
            pair.release("log_q")
            grad_a = q - pair.p
        pair.release("p", "q", "e")
        return _masked(grad_a, pair.regular), grad_b

    return value, grads


def symmetric_kl_terms(pair, teacher_grad=True):
    axis = pair.axis
    difference = pair.p_minus_q()
    # (P - Q) u >= 0 term by term: P - Q has the sign of u.
    total = rowdot(difference, pair.u, axis)
    value = _non_negative(total)

    def grads():
        q, p, u = pair.q, pair.p, pair.u
        # E_Q[u] as a plain sum on either path: its rounding (1e-7 of
        # E|u|) is far below the |u| it is subtracted from; and E_P[u] =
        # E_Q[u] + sum((P - Q) u) without another pass.
        mean_q = rowdot(q, u, axis)
        mean_p = mean_q + total
        spread = _spread if pair.regular is not None else _plain_spread
        grad_a = _masked(-spread(q, u, mean_q) - difference, pair.regular)
        grad_b = None
        if teacher_grad:
            grad_b = _masked(spread(p, u, mean_p) + difference, pair.regular)
        return grad_a, grad_b

    return value, grads


def jsd_terms(pair, beta, teacher_grad=True):
    """Generalized JSD with `0 < beta < 1` (see `jensen_shannon_divergence`).

    Precise: with `l = log(M / Q) = log1p(beta expm1(u))` and
    `x = log(P / M) = u - l`, `KL(Q || M) = sum Q psi(l)` and
    `KL(P || M) = sum M phi(x)`, both termwise non-negative.
    """
    axis, q, p = pair.axis, pair.q, pair.p
    if pair.precise:
        to_mix, from_mix, x, l_ = _precise_jsd_parts(pair, beta)
        kl_pm = lr.rowsum(to_mix, axis)  # KL(P || M)
        kl_qm = lr.rowsum(from_mix, axis)  # KL(Q || M)
    else:
        # M from the probabilities (one log, fused under XLA); the
        # smallest normal float keeps its log finite where both have no
        # mass or underflow (a subnormal may be flushed to 0), and changes
        # only terms below 1e-38 * |log M|.
        dtype = dtype_of(q)
        tiny = float(np.finfo(dtype).tiny)
        log_m = ops.log((p - q) * beta + q + tiny)
        l_, x = log_m - pair.log_q, pair.log_p - log_m
        kl_pm = rowdot(p, x, axis)
        kl_qm = -rowdot(q, l_, axis)
    value = _non_negative(beta * kl_pm + (1.0 - beta) * kl_qm)
    if pair.precise and pair.regular is not None:
        # The identities behind the precise terms assume both sum to 1; a
        # row where one has no mass has a closed form.
        dtype = value.dtype
        fallback = ops.where(
            pair.empty_p, 0.0, _constant(-beta * math.log(beta), dtype)
        )
        fallback = fallback + ops.where(
            pair.empty_q, 0.0, _constant(-(1 - beta) * math.log1p(-beta), dtype)
        )
        # ... and NaN where the side with mass has a NaN.
        fallback = fallback + lr.rowsum(p + q, axis) * 0.0
        value = ops.where(pair.regular, value, fallback)

    def grads():
        # E_Q[l] = -KL(Q || M), E_P[x] = KL(P || M).
        spread = _spread if pair.regular is not None else _plain_spread
        grad_a = spread(q, l_, -kl_qm) * -(1.0 - beta)
        grad_a = _masked(grad_a, pair.regular)
        grad_b = None
        if teacher_grad:
            grad_b = _masked(spread(p, x, kl_pm) * beta, pair.regular)
        return grad_a, grad_b

    return value, grads


def _precise_jsd_parts(pair, beta):
    u, q, p, e = pair.u, pair.q, pair.p, pair.e
    below = pair.below_one
    # l = log(beta e^u + 1 - beta); above u = 1 as u + log(beta) + log1p(..)
    # of exp(-u) <= 1/e, exact for any u.
    far_u = ops.where(below, 1.0, u)
    x_far = -math.log(beta) - ops.log1p((1.0 - beta) / beta * ops.exp(-far_u))
    l_near = ops.log1p(beta * e)
    l_ = ops.where(below, l_near, far_u - x_far)
    # x = u - l without the cancellation of two large numbers above u = 1;
    # x <= -log(beta), so expm1(x) cannot overflow.
    x = ops.where(below, u - l_near, x_far)
    mix = beta * p + (1.0 - beta) * q
    x_small = ops.abs(x) < lr.SERIES_BELOW
    ex = ops.expm1(x)
    to_mix = ops.where(
        x_small,
        mix * lr.series(ops.where(x_small, x, 0.0), "phi"),
        mix * (x * (1.0 + ex) - ex),
    )
    l_small = ops.abs(l_) < lr.SERIES_BELOW
    # e^l - 1 = beta expm1(u) exactly, and M - Q = beta (P - Q).
    from_mix = ops.where(
        l_small,
        q * lr.series(ops.where(l_small, l_, 0.0), "psi"),
        ops.where(below, q * (beta * e - l_), beta * (p - q) - q * l_),
    )
    return to_mix, from_mix, x, l_


def _log_mixture(log_p, log_q, beta):
    # log(beta * P + (1 - beta) * Q) by a two-term logsumexp of finite logs:
    # `high - low` never overflows, and an entry where neither has mass
    # stays at about L. `where`, not `ops.maximum`, which computes float64
    # in float32 on torch.
    a = log_p + math.log(beta)
    b = log_q + math.log1p(-beta)
    a_lower = a < b
    high = ops.where(a_lower, b, a)
    low = ops.where(a_lower, a, b)
    return high + ops.log1p(ops.exp(low - high))


TERMS = {
    "kl": kl_terms,
    "symmetric_kl": symmetric_kl_terms,
    "jsd": jsd_terms,
}


def _expand(x, axis, ndim):
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in sorted(a % ndim for a in axes):
        x = ops.expand_dims(x, a)
    return x
