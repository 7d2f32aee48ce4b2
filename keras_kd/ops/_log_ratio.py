"""Two softmax distributions and their log-ratio, the pieces every softmax
divergence is built from, on the fast and on the precise path.

Notation (one row; `a = s / T` student, `b = t / T` teacher):
`Q = softmax(a)`, `P = softmax(b)`, `u = log P - log Q`.

Fast path: `u = log_softmax(b) - log_softmax(a)`, each log-softmax exact to
float32 rounding of its own value, so `u` is off by about
`1e-7 * (|log P| + |log Q|)`: nothing when the divergence is large, 100% of
a divergence of 1e-7 (a student within 1e-3 of its teacher).

Precise path (exact where distillation ends, a student near its
teacher, where the fast path's `u` loses every digit): with
`d = (t - s) / T`, any per-row shift `k` and `w = d - k`,

```
c = log E_Q[exp(d - k)] = log1p(E_Q[expm1(w)]),   u = w - c
```

`t - s` is taken exactly as the sum `hi + lo` of two floats (Knuth's
TwoSum), so a student whose logits equal the teacher's plus a constant
(softmax does not see it) is as exact as one without. `c` is exact for any
`k`; `k` is the difference of the row maxima (`E_Q[d]` is as good and
costs another pass over the logits), which makes `w` small where
the student is near its teacher, so `u` is exact to the rounding of `w`
and of one row sum. The divergences are then sums of termwise
non-negative, cancellation-free terms: `Q phi(u)` with
`phi(u) = 1 + (u - 1) e^u`, `Q psi(u)` with `psi(u) = e^u - 1 - u`, each by
its power series below `|u| = 0.5` and by a closed form that cannot cancel
above it. In a near row no other transcendental function of the logits is
needed: `Q e^u = Q (1 + expm1(w)) e^-c`, `P - Q = Q (expm1(w) e^-c +
expm1(-c))`.

A row is near when `|c| < 0.5` (then `1 + E_Q[expm1(w)]` cannot cancel).
Any other row (far from its teacher, where the fast path has nothing to
cancel; `w` of 60 or more where `P` has mass; mass on the teacher's side
only, or none on one side) takes the fast path's `u`; the formulas built on
`u` hold for any `u`, so such rows stay non-negative and exact to the fast
path's accuracy.
"""

import math

import keras
from keras import ops

from keras_kd.ops._core import (
    _constant,
    _log_softmax_parts,
    _lowest,
    _reduce_max,
    dtype_of,
)

SERIES_BELOW = 0.5
# Rows whose log-partition difference c stays below this are near.
_NEAR = 0.5
# Beyond it `expm1(w)` nears the float32 limit: the row is far, not near.
_FAR = 60.0
# phi(u) = sum_{k>=2} (k - 1) u^k / k!, psi(u) = sum_{k>=2} u^k / k!, up
# to k = 10 (float32) and 18 (float64): at |u| = 0.5 the first term left
# out is below 1e-9 (float32) and 1e-18 (float64) of the sum.
_LAST_TERM = {"float32": 11, "float64": 19}


def series(x, kind):
    """`phi(x)` (`kind="phi"`) or `psi(x)` by Horner's rule; `|x| <= 0.5`.

    The one home of both series: the softmax divergences, the fused linear
    losses and the top-k buckets take them from here."""
    last = _LAST_TERM[dtype_of(x)]
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


class _lazy:
    """`functools.cached_property` without its lock: computed on first
    read and kept in the instance's `__dict__` (where `Pair.release` drops
    it). Python 3.11's lock stops torch.compile from tracing a pair."""

    def __init__(self, function):
        self.function = function
        self.name = function.__name__
        self.__doc__ = function.__doc__

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        value = self.function(instance)
        instance.__dict__[self.name] = value
        return value


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
            `None` when that is known (torch's optimistic path): from
            `empty`, the pair `(empty_p, empty_q)` given by the caller.
        empty_p, empty_q: per row, whether `P` (`Q`) has no mass at all
            (or `None`).
        precise: whether `u` is the precise one.
    """

    def __init__(self, log_p, log_q, axis, empty=None, p=None, q=None):
        self.log_p, self.log_q, self.axis = log_p, log_q, axis
        # Probabilities computed with the log-probabilities (the cached
        # properties below are the fallback).
        if p is not None:
            self.p = p
        if q is not None:
            self.q = q
        self.precise = False
        # The student's row normalizer, where known (NaN for a NaN row).
        self.q_total = None
        # On torch (eager, gradient wanted) the divergences free pieces as
        # soon as they are done with them: each is a logits-sized buffer.
        self.frugal = False
        self.regular = self.empty_p = self.empty_q = None
        if empty is not None:
            self.empty_p, self.empty_q = empty
            self.regular = ops.logical_not(
                ops.logical_or(self.empty_p, self.empty_q)
            )

    def make_precise(self, w, expm1_w, c):
        """Takes `u = w - c` in the rows where `c` is finite (near rows),
        with `expm1_w = expm1(w)` (`inf` where `w` is far), and the fast
        `u` elsewhere.

        In a near row every other piece comes from `expm1(w)` and the row
        constants `e^-c`, `expm1(-c)`, without another transcendental
        function of the logits: `Q e^u = Q (1 + expm1(w)) e^-c` and
        `P - Q = Q (expm1(w) e^-c + expm1(-c))`.
        """
        self.precise = True
        # |c| < 0.5: 1 + S (S the sum behind c) is in [0.6, 1.7], so c has
        # no cancellation, and u = w - c is at least as exact as the fast
        # u (a far row can have w around -80 where Q has its mass, and S
        # within 1e-3 of -1). Near the teacher c is about the KL.
        self.near = ops.logical_and(ops.isfinite(c), ops.abs(c) < _NEAR)
        if self.regular is not None:
            # A row where one side has no mass at all has an infinite
            # shift, and nothing there is near.
            self.near = ops.logical_and(self.near, self.regular)
        self._w = w
        # Finite in every branch (see `e`).
        self._ew = ops.where(ops.isfinite(expm1_w), expm1_w, 0.0)
        c = ops.where(self.near, c, 0.0)
        self._c = c
        self._k = ops.exp(-c)
        self._m1c = ops.expm1(-c)

    def release(self, *names):
        """Drops computed pieces (only when `frugal`)."""
        if self.frugal:
            for name in names:
                self.__dict__.pop(name, None)
                if name in ("log_p", "log_q"):
                    setattr(self, name, None)

    @_lazy
    def u(self):
        fast = self.log_p - self.log_q
        if not self.precise:
            return fast
        return ops.where(self.near, self._w - self._c, fast)

    @_lazy
    def p(self):
        return ops.exp(self.log_p)

    @_lazy
    def q(self):
        return ops.exp(self.log_q)

    @_lazy
    def below_one(self):
        return self.u < 1.0

    @_lazy
    def small(self):
        return ops.abs(self.u) < SERIES_BELOW

    @_lazy
    def q_exp_u(self):
        """`P` as `Q e^u`: exact to rounding of `u` in near rows."""
        if not self.precise:
            return self.p
        near = self.q * (1.0 + self._ew) * self._k
        return ops.where(self.near, near, self.p)

    @_lazy
    def e(self):
        """`expm1(u)` where `u < 1`, 0 elsewhere (where no formula reads
        it): finite, so no unused `where` branch holds an infinity whose
        zero cotangent would turn into NaN in a second-order gradient."""
        far = ops.expm1(ops.where(self.below_one, self.u, 0.0))
        if not self.precise:
            return far
        near = ops.where(self.below_one, self._ew * self._k + self._m1c, 0.0)
        return ops.where(self.near, near, far)

    def p_minus_q(self):
        """`P - Q`, without cancellation in near rows."""
        fast = self.p - self.q
        if not self.precise:
            return fast
        near = self.q * (self._ew * self._k + self._m1c)
        return ops.where(self.near, near, fast)

    def q_phi(self):
        """`Q phi(u) = Q + (u - 1) P >= 0`, the terms of `KL(P || Q)`: the
        power series below `|u| = 0.5`, where the closed form cancels."""
        u, q = self.u, self.q
        near = q * series(ops.where(self.small, u, 0.0), "phi")
        return ops.where(self.small, near, q + (u - 1.0) * self.q_exp_u)


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
    log_p, p, _, _ = _log_softmax_parts(t, axis, temperature, True)
    log_q, q, exps, total = _log_softmax_parts(s, axis, temperature, True)
    student = (q, exps, total)
    return pair_of_logs(
        t, s, log_p, log_q, temperature, axis, precise, p, student
    )


def pair_of_logs(
    t, s, log_p, log_q, temperature, axis, precise, p=None, student=None
):
    """`softmax_pair` when the engine's log-probabilities (and maybe the
    probabilities: `p`, and `student = (q, exps, total)` from
    `_log_softmax_parts`) of `t` and `s` are at hand."""
    q, exps, total = (None, None, None) if student is None else student
    # The same row maxima as inside `_log_softmax`: under XLA one pass
    # computes both. A row without mass has a maximum of -inf; NaN is not.
    top_t = ops.stop_gradient(_reduce_max(t, axis))
    top_s = ops.stop_gradient(_reduce_max(s, axis))
    empty = (top_t == -math.inf, top_s == -math.inf)
    pair = Pair(log_p, log_q, axis, empty=empty, p=p, q=q)
    pair.q_total = total
    if precise:
        # E_Q[...] as sum(exps * ...) / total: under XLA the reduction
        # then reads the exponentials already stored, not another array.
        weights, scale = (pair.q, 1.0) if exps is None else (exps, total)
        w, expm1_w, c = _precise_log_ratio(
            t, s, weights, scale, temperature, axis, top_t - top_s
        )
        pair.make_precise(w, expm1_w, c)
    return pair


def _at_least(x, low):
    """`max(x, low)`, NaN kept. Keras' torch `maximum` computes float64 in
    float32, so `where` there (under XLA `maximum` fuses better)."""
    if keras.backend.backend() == "torch":
        return ops.where(x < low, low, x)
    return ops.maximum(x, low)


def optimistic_precise(pair, t, s, temperature, axis):
    """Makes an unguarded pair (torch's optimistic path, see
    `_softmax_driver._optimistic_pair`) precise, without the guards for
    `-inf` either: those make the value non-finite, and the caller then
    takes the guarded path."""
    top_t = ops.stop_gradient(_reduce_max(t, axis))
    top_s = ops.stop_gradient(_reduce_max(s, axis))
    w, expm1_w, c = _precise_log_ratio(
        t, s, pair.q, 1.0, temperature, axis, top_t - top_s, guard=False
    )
    pair.make_precise(w, expm1_w, c)
    return pair


def _precise_log_ratio(
    t, s, weights, scale, temperature, axis, shift, guard=True
):
    """`(w, expm1(w), c)` with `u = w - c` exact to rounding in the rows
    where `c` is finite (see the module docstring); `weights / scale` is
    `Q`.

    `shift` is any per-row number near `t - s` where the mass is (the
    difference of the row maxima): `c` is exact for any, and `w` is then
    small where the student is near its teacher.
    """
    # -inf (no mass) becomes the lowest float: no mass on either side
    # gives w = 0 (a term 0 * phi(0)), mass on the student's side only a
    # hugely negative w (its term Q * phi(-inf) = Q), mass on the
    # teacher's side only a far row (w beyond 60). `maximum` keeps a NaN
    # (on every backend), and a NaN makes its row far.
    lowest = _constant(_lowest(t.dtype), t.dtype)
    if guard:
        t, s = _at_least(t, lowest), _at_least(s, lowest)
    # TwoSum: hi + lo == t - s exactly, for any finite t, s whose
    # difference does not overflow.
    hi = t - s
    back = hi - t
    lo = (t - (hi - back)) - (s + back)
    w = (hi - shift) + lo
    if isinstance(temperature, float):
        w = w if temperature == 1.0 else w * (1.0 / temperature)
    else:
        w = w / ops.cast(temperature, w.dtype)
    # Below the lowest float (the shift pushed a masked entry beyond it),
    # the lowest float: u stays finite, and 0 * u is 0.
    if guard:
        w = _at_least(w, lowest)
    # A w of 60 or more where P has mass is a far row (no term may
    # overflow, and where Q underflowed to 0 the term would be lost): it
    # makes the sum infinite or NaN. `>`, not `<=`: NaN stays NaN.
    expm1_w = ops.where(w > _FAR, _constant(math.inf, t.dtype), ops.expm1(w))
    c = ops.log1p(rowsum(weights * expm1_w, axis) / scale)
    return w, expm1_w, c
