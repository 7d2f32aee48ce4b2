"""Two softmax distributions and their log-ratio, the pieces every softmax
divergence is built from, on the fast and on the precise path.

Notation (one row; `a = s / T` student, `b = t / T` teacher):
`Q = softmax(a)`, `P = softmax(b)`, `u = log P - log Q`.

Fast path: `u = log_softmax(b) - log_softmax(a)`, each log-softmax exact to
float32 rounding of its own value, so `u` is off by about
`1e-7 * (|log P| + |log Q|)`: nothing when the divergence is large, 100% of
a divergence of 1e-7 (a student within 1e-3 of its teacher).

Precise path (`../shared/SPEC.md`, "Exactness where distillation ends"):
with `d = (t - s) / T`, `m = E_Q[d]`, `w = d - m`,

```
c = log E_Q[exp(d)] = m + log1p(E_Q[expm1(w)]),   u = d - c = w - log1p(...)
```

`t - s` is taken exactly as the sum `hi + lo` of two floats (Knuth's
TwoSum), so a student whose logits equal the teacher's plus a constant
(softmax does not see it) is as exact as one without; `m` only centres `w`
(`c` is exact for any `m`), so `u` is exact to the rounding of `w` and of
the row sum. The divergences are then sums of termwise non-negative,
cancellation-free terms: `Q phi(u)` with `phi(u) = 1 + (u - 1) e^u`,
`Q psi(u)` with `psi(u) = e^u - 1 - u`, each by its power series below
`|u| = 0.5` and by a closed form that cannot cancel above it.

A row whose `w` reaches 60 where `Q` has mass (far from the teacher, where
the fast path has no cancellation to fear), or where one distribution has
mass and the other none, takes the fast path's `u`; the formulas built on
`u` hold for any `u`, so such rows stay non-negative and exact to the fast
path's accuracy.
"""

import functools
import math

import keras
from keras import ops

from keras_kd.ops._core import (
    _constant,
    _log_softmax,
    _lowest,
    _reduce_max,
)

SERIES_BELOW = 0.5
# Beyond it `expm1(w)` nears the float32 limit: the row is far, not near.
_FAR = 60.0
# phi(u) = sum_{k>=2} (k - 1) u^k / k!, psi(u) = sum_{k>=2} u^k / k!: at
# |u| = 0.5 the first term left out is below 1e-9 (float32, k <= 11) and
# 1e-18 (float64, k <= 19) of the sum.
_LAST_TERM = {"float32": 11, "float64": 19}


def _dtype(x):
    return keras.backend.standardize_dtype(x.dtype)


def series(x, kind):
    """`phi(x)` (`kind="phi"`) or `psi(x)` by Horner's rule; `|x| <= 0.5`."""
    last = _LAST_TERM[_dtype(x)]
    if kind == "phi":
        coefficients = [(k - 1) / math.factorial(k) for k in range(2, last)]
    else:
        coefficients = [1.0 / math.factorial(k) for k in range(2, last)]
    total = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        total = total * x + c
    return total * x * x


def rowsum(x, axis):
    return ops.sum(x, axis=axis, keepdims=True)


def rowmax(x, axis):
    return _reduce_max(x, axis)


class Pair:
    """Per-entry and per-row pieces of `P` (teacher) and `Q` (student),
    each computed when first read (on torch every piece is a pass over
    memory, and each divergence reads only some).

    Attributes:
        log_p, log_q: log-probabilities; finite on the engine path (`L`,
            the dtype's lowest value, where there is no mass).
        p, q: the probabilities (0 where there is no mass).
        u: `log P - log Q` (precise or fast, see `precise`).
        regular: per row (keepdims), whether both distributions have mass
            (a fully masked row has none; a NaN row counts as regular), or
            `None` when that is known (torch's optimistic path).
        empty_p, empty_q: per row, whether `P` (`Q`) has no mass at all
            (or `None`).
        precise: whether `u` is the precise one.
    """

    def __init__(self, log_p, log_q, axis, u=None, precise=False, flags=True):
        self.log_p, self.log_q, self.axis = log_p, log_q, axis
        self.precise = precise
        self._u = u
        # On torch (eager, gradient wanted) the divergences free pieces as
        # soon as they are done with them: each is a logits-sized buffer.
        self.frugal = False
        self.regular = self.empty_p = self.empty_q = None
        if flags:
            lowest = _lowest(log_p.dtype)
            self.empty_p = rowmax(log_p, axis) == lowest
            self.empty_q = rowmax(log_q, axis) == lowest
            self.regular = ops.logical_not(
                ops.logical_or(self.empty_p, self.empty_q)
            )

    def release(self, *names):
        """Drops computed pieces (only when `frugal`)."""
        if self.frugal:
            for name in names:
                self.__dict__.pop(name, None)
                if name in ("log_p", "log_q", "_u"):
                    setattr(self, name, None)

    @functools.cached_property
    def u(self):
        return self.log_p - self.log_q if self._u is None else self._u

    @functools.cached_property
    def p(self):
        return ops.exp(self.log_p)

    @functools.cached_property
    def q(self):
        return ops.exp(self.log_q)

    @functools.cached_property
    def below_one(self):
        return self.u < 1.0

    @functools.cached_property
    def small(self):
        return ops.abs(self.u) < SERIES_BELOW

    @functools.cached_property
    def e(self):
        """`expm1(u)` where `u < 1`, 0 elsewhere (where no formula reads
        it): finite, so no unused `where` branch holds an infinity whose
        zero cotangent would turn into NaN in a second-order gradient."""
        return ops.expm1(ops.where(self.below_one, self.u, 0.0))

    def p_minus_q(self):
        """`P - Q`, as `Q expm1(u)` where that has no cancellation."""
        if not self.precise:
            return self.p - self.q
        return ops.where(self.below_one, self.q * self.e, self.p - self.q)

    def q_phi(self):
        """`Q phi(u) = P u - P + Q >= 0`, the terms of `KL(P || Q)`."""
        return weighted_phi(
            self.u, self.q, self.p, self.e, self.small, self.below_one
        )

    def q_psi(self):
        """`Q psi(u) = P - Q - Q u >= 0`, the terms of `KL(Q || P)`."""
        u, q = self.u, self.q
        near = q * series(ops.where(self.small, u, 0.0), "psi")
        middle = q * (self.e - u)
        far = (self.p - q) - q * u
        return ops.where(
            self.small, near, ops.where(self.below_one, middle, far)
        )


def weighted_phi(u, q, p, e=None, small=None, below_one=None):
    """`q * phi(u)` with `p = q * e^u`: the terms of `KL(P || Q)`, each
    non-negative and without cancellation. `e = expm1(u)` where `u < 1`
    (0 elsewhere), `small = |u| < 0.5` and `below_one = u < 1` may be
    given when already computed."""
    if below_one is None:
        below_one = u < 1.0
    if small is None:
        small = ops.abs(u) < SERIES_BELOW
    if e is None:
        e = ops.expm1(ops.where(below_one, u, 0.0))
    near = q * series(ops.where(small, u, 0.0), "phi")
    # phi(u) = u (1 + e) - e: no cancellation for |u| >= 0.5.
    middle = q * (u * (1.0 + e) - e)
    # u >= 1: a sum of two non-negative terms.
    far = q + (u - 1.0) * p
    return ops.where(small, near, ops.where(below_one, middle, far))


def expm1_times(u, q, p):
    """`q * expm1(u) = p - q`, without cancellation where `u` is small."""
    below_one = u < 1.0
    e = ops.expm1(ops.where(below_one, u, 0.0))
    return ops.where(below_one, q * e, p - q)


def softmax_pair(t, s, temperature, axis, precise):
    """The `Pair` of `P = softmax(t / T)` and `Q = softmax(s / T)`.

    Args:
        t, s: logits of the same shape and float dtype (`-inf` for no mass).
        temperature: a validated temperature (float or scalar tensor).
        axis: the class axis (an int or a tuple of ints).
        precise: whether to compute `u` on the precise path.
    """
    log_p = _log_softmax(t, axis, temperature)
    log_q = _log_softmax(s, axis, temperature)
    if not precise:
        return Pair(log_p, log_q, axis)
    u = _precise_log_ratio(t, s, log_p, log_q, temperature, axis)
    return Pair(log_p, log_q, axis, u=u, precise=True)


def _precise_log_ratio(t, s, log_p, log_q, temperature, axis):
    """`u = d - c` exact to rounding (see the module docstring)."""
    lowest = _lowest(t.dtype)
    both = ops.logical_and(log_p > lowest, log_q > lowest)
    # Not `~(mass_p | mass_q)`: a NaN is neither mass nor no mass.
    neither = ops.logical_and(log_p == lowest, log_q == lowest)
    # TwoSum: hi + lo == t - s exactly, for any finite t, s whose
    # difference does not overflow.
    hi = t - s
    back = hi - t
    lo = (t - (hi - back)) - (s + back)
    # An entry with mass on one side only (or a NaN) makes its row far
    # (NaN reaches the row's test below); no mass on either side
    # contributes nothing.
    nan = _constant(math.nan, t.dtype)
    hi = ops.where(both, hi, ops.where(neither, 0.0, nan))
    lo = ops.where(both, lo, 0.0)
    q = ops.exp(log_q)
    # Any m gives the same c; the gradient through it is zero in exact
    # arithmetic, so none is taken.
    m = ops.stop_gradient(rowsum(q * hi, axis))
    w = (hi - m) + lo
    if isinstance(temperature, float):
        w = w if temperature == 1.0 else w * (1.0 / temperature)
    else:
        w = w / ops.cast(temperature, w.dtype)
    # Where either has mass (Q may have underflowed to 0 where P has not):
    # below 60, no term of the sum overflows and none that underflowed
    # mattered.
    reach = rowmax(ops.where(both, w, -math.inf), axis)
    # `>`, not `<`: a NaN (mass on one side only) must reach c.
    bounded = ops.where(w > _FAR, _FAR, w)
    c = ops.log1p(rowsum(q * ops.expm1(bounded), axis))
    near = ops.logical_and(reach < _FAR, ops.isfinite(c))
    return ops.where(near, w - c, log_p - log_q)
