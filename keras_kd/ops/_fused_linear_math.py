"""Per-chunk math of the fused linear losses: values and logit gradients.

Everything here works on one chunk of logits `[chunk, vocab]` and returns
per-token values and the gradient with respect to the student's logits;
`_chunk_engine.py` loops over the chunks. Nothing here is
differentiated by the backend: the gradients are written out, so a `where`
whose unused branch overflows is harmless.

Notation (one row): `a = (s - max s) / T`, `b = (t - max t) / T`,
`Q = softmax(a)` (student), `P = softmax(b)` (teacher),
`d = b - a`, `m = E_Q[d]`, `w = d - m`, and

```
R = KL(Q || P) = log E_Q[exp(w)] = log1p(E_Q[psi(w)])
u = log P - log Q = w - R  (= d - log(sum e^b / sum e^a) where R > 1)
```

with `psi(x) = exp(x) - 1 - x` and `phi(x) = 1 + (x - 1) exp(x)`. The
linear term `E_Q[w]` is 0 in exact arithmetic and left out: its rounding
noise would otherwise swamp a divergence of 1e-8 (a student close to its
teacher). `u` is then exact to rounding of `d`, and every divergence is a
sum of non-negative terms (`Q phi(u)`, `Q psi(l)`, ...), each computed
without cancellation: a power series for small arguments, a closed form
from `P` and `Q` elsewhere.
"""

import math

from keras import ops

from keras_kd.ops._core import _constant, dtype_of
from keras_kd.ops._log_ratio import SERIES_BELOW, series

# exp() of anything above this overflows (float32 ~88.7, float64 ~709.8).
_EXP_LIMIT = {"float32": 80.0, "float64": 700.0}


def _half_shift(z):
    """`(z - max z) / 2` per row: the halves cannot overflow for any finite
    logits, and doubling back is exact."""
    # `amax`: Keras' torch `max` breaks a torch.compile graph.
    top = ops.amax(z, axis=-1, keepdims=True)
    return z * 0.5 - top * 0.5


def _softmax_parts(half, scale):
    """`(exp(x), sum exp(x), softmax(x))` of `x = half * scale <= 0`."""
    e = ops.exp(half * scale)
    total = ops.sum(e, axis=-1, keepdims=True)
    return e, total, e / total


def soft_cap(z, cap):
    """Gemma's logit soft-capping `cap * tanh(z / cap)` (or `z`)."""
    return z if cap is None else ops.tanh(z / cap) * cap


def soft_cap_slope(z, cap):
    """`d soft_cap(z) / d z = 1 - tanh(z / cap)**2`, as
    `4 e / (1 + e)**2` with `e = exp(-2 |z / cap|)`: `1 - tanh**2` loses
    every digit where the cap saturates."""
    e = ops.exp(ops.abs(z / cap) * -2.0)
    return 4.0 * e / ops.square(1.0 + e)


def student_parts(zs, scale):
    """`(half, total, q)` of the student's logits: `half = (zs - max) / 2`,
    `q = softmax(half * scale)` and `total` its normalizer."""
    half = _half_shift(zs)
    _, total, q = _softmax_parts(half, scale)
    return half, total, q


def divergence_terms(student, zt, scale, divergence, beta):
    """Per-row divergence and its gradient with respect to the student's
    scaled logits `a = s / T` (the caller multiplies by `T**2 / T = T`).

    Args:
        student: `student_parts` of the student's logits `[chunk, vocab]`.
        zt: teacher logits, same shape (capped, padding columns removed).
        scale: `2 / T`, a float or a scalar tensor of the compute dtype.
        divergence: `"kl"`, `"reverse_kl"` or `"jsd"`.
        beta: the JSD mixing weight, strictly inside (0, 1) for `"jsd"`.

    Returns:
        `(value [chunk], grad [chunk, vocab])`: `value` is the divergence
        without the `T**2` factor, `grad` its gradient with respect to `a`.
    """
    a_half, sa, q = student
    dtype = dtype_of(q)
    limit = _EXP_LIMIT[dtype]
    b_half = _half_shift(zt)
    eb, sb, p = _softmax_parts(b_half, scale)
    # Both halves are <= 0, so their difference cannot overflow; the
    # subtraction comes before the scale so that d is exact to one rounding.
    d = (b_half - a_half) * scale
    # E_Q[d] in two passes: d may be ~1e3 where Q has its mass, and the
    # rounding of a one-pass mean would then show in `w` and in the
    # gradients; the second pass only sees the spread of d around it.
    rough = ops.sum(q * d, axis=-1, keepdims=True)
    centered = d - rough
    fine = ops.sum(q * centered, axis=-1, keepdims=True)
    w = centered - fine
    m = rough + fine
    log_ratio = ops.log(sb) - ops.log(sa)
    # Q exp(w) = exp(b) exp(-m) / sa: no overflow where exp(w) would. Rows
    # where -m is large have R > 1 and take `reverse_std` instead.
    q_exp_w = eb * (ops.exp(ops.minimum(-m, _constant(limit, dtype))) / sa)
    small_w = ops.abs(w) < SERIES_BELOW
    psi_w = ops.where(small_w, q * series(w, "psi"), q_exp_w - q - q * w)
    reverse_near = ops.log1p(ops.sum(psi_w, axis=-1, keepdims=True))
    # Far from the teacher (R > 1) the plain differences have no
    # cancellation, and the sum above may have overflowed.
    reverse_std = log_ratio - rough - fine
    far = reverse_std > 1.0
    reverse = ops.where(far, reverse_std, reverse_near)
    if divergence == "reverse_kl":
        # d R / d a = Q (log Q - log P - R) = -Q w.
        return ops.squeeze(reverse, -1), -q * w
    # u = log P - log Q = (d - m) - R near the teacher (d - m first: it is
    # exact where d ~ m), d - log_ratio far from it (m may be ~1e3 there).
    # Row-wise choices: a [chunk, vocab] `where` is slow on torch.
    zero = ops.zeros_like(m)
    u = (d - ops.where(far, log_ratio, m)) - ops.where(far, zero, reverse_near)
    small_u = ops.abs(u) < SERIES_BELOW
    if divergence == "kl":
        psi_u = series(u, "psi")
        # P - Q = Q expm1(u), with expm1(u) = u + psi(u) near 0.
        p_minus_q = ops.where(small_u, q * (u + psi_u), p - q)
        # Q phi(u) = Q (u expm1(u) - psi(u)) near 0, Q - P + u P elsewhere.
        terms = ops.where(
            small_u, q * (u * (u + psi_u) - psi_u), u * p - p_minus_q
        )
        return ops.sum(terms, axis=-1), -p_minus_q
    return _jsd_terms(u, p, q, beta, limit)


def fast_divergence_terms(student, zt, scale, divergence, beta):
    """`divergence_terms` on the fast path (`precise=False`): the plain
    log-space formulas, about a third of the elementwise passes.

    The log-ratio `log P - log Q` comes from the logit difference, so no
    log-probability is ever `log(0)` and confident logits stay exact; what
    is lost is the relative accuracy of a divergence much smaller than the
    log-probabilities (a student very close to its teacher), as on the fast
    path of every divergence in `keras_kd.ops`. Values are clamped at 0.
    """
    a_half, sa, q = student
    b_half = _half_shift(zt)
    eb, sb, p = _softmax_parts(b_half, scale)
    log_sa, log_sb = ops.log(sa), ops.log(sb)
    # log P - log Q, the halves subtracted first (cannot overflow).
    u = (b_half - a_half) * scale - (log_sb - log_sa)
    zero = _constant(0.0, q.dtype)
    if divergence == "kl":
        value = ops.sum(p * u, axis=-1)
        return ops.maximum(value, zero), q - p
    if divergence == "reverse_kl":
        value = -ops.sum(q * u, axis=-1, keepdims=True)
        grad = -q * (u + value)
        return ops.maximum(ops.squeeze(value, -1), zero), grad
    # log(M / Q) = log((1 - beta) + beta exp(u)), as a logaddexp of two
    # finite terms: P and Q may both underflow to 0 where M's log cannot.
    dtype = dtype_of(q)
    log_beta = _constant(math.log(beta), dtype)
    log_rest = _constant(math.log1p(-beta), dtype)
    l_ = ops.logaddexp(u + log_beta, ops.zeros_like(u) + log_rest)
    # JSD = beta E_P[u - l] + (1 - beta) E_Q[-l].
    value = beta * ops.sum(p * (u - l_), axis=-1) - (1.0 - beta) * ops.sum(
        q * l_, axis=-1
    )
    mean_l = ops.sum(q * l_, axis=-1, keepdims=True)
    grad = (1.0 - beta) * q * (mean_l - l_)
    return ops.maximum(value, zero), grad


def _jsd_terms(u, p, q, beta, limit):
    """Generalized JSD from `u = log P - log Q`, with `M = beta P +
    (1 - beta) Q`, `l = log(M / Q)` and `x = log(P / M)`:

    ```
    JSD = beta KL(P || M) + (1 - beta) KL(Q || M)
        = beta sum M phi(x) + (1 - beta) sum Q psi(l)
    d JSD / d a = (1 - beta) Q (E_Q[l] - l)
    ```
    """
    dtype = dtype_of(u)
    cap = _constant(limit, dtype)
    # log1p of a small multiple of expm1: exact near u = 0; the asymptotes
    # beyond the exp limit are exact to float rounding.
    l_near = ops.log1p(beta * ops.expm1(ops.minimum(u, cap)))
    l_ = ops.where(u > cap, u + math.log(beta), l_near)
    x_near = -ops.log1p((1.0 - beta) * ops.expm1(ops.minimum(-u, cap)))
    x = ops.where(-u > cap, u - math.log1p(-beta), x_near)
    mix = beta * p + (1.0 - beta) * q
    psi_x, psi_l = series(x, "psi"), series(l_, "psi")
    # M phi(x) = M + (x - 1) P; Q psi(l) = M - Q - Q l.
    to_mix = ops.where(
        ops.abs(x) < SERIES_BELOW,
        mix * (x * (x + psi_x) - psi_x),
        mix - p + x * p,
    )
    from_mix = ops.where(
        ops.abs(l_) < SERIES_BELOW, q * psi_l, mix - q - q * l_
    )
    value = beta * ops.sum(to_mix, axis=-1) + (1.0 - beta) * ops.sum(
        from_mix, axis=-1
    )
    mean_l = ops.sum(q * l_, axis=-1, keepdims=True)
    return value, (1.0 - beta) * q * (mean_l - l_)


def cross_entropy_terms(half, labels, at_one=None):
    """Per-row next-token cross-entropy at temperature 1 and its gradient
    with respect to the student's logits.

    Args:
        half: `(zs - max zs) / 2` of the student's logits `[chunk, vocab]`.
        labels: integer ids `[chunk]`.
        at_one: `(total, q)` of `student_parts` when they were computed at
            temperature 1, else `None`.

    Returns:
        `(value [chunk], grad [chunk, vocab], valid [chunk])`. A label
        outside `[0, vocab)` gives NaN in its row's value (never a finite
        wrong loss); `valid` marks the rows whose gradient is right, the
        caller makes the others NaN.
    """
    if at_one is None:
        _, total, q = _softmax_parts(half, 2.0)
    else:
        total, q = at_one
    vocab = half.shape[-1]
    labels = ops.cast(labels, "int32")
    valid = ops.logical_and(labels >= 0, labels < vocab)
    safe = ops.expand_dims(ops.where(valid, labels, 0), -1)
    picked = ops.squeeze(ops.take_along_axis(half, safe, axis=-1), -1)
    value = ops.squeeze(ops.log(total), -1) - picked * 2.0
    value = ops.where(valid, value, _constant(math.nan, half.dtype))
    hit = safe == ops.arange(vocab, dtype="int32")
    return value, q - ops.cast(hit, half.dtype), valid
