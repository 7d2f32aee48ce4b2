"""Per-row accuracy of the KL against float64, with torch's `F.kl_div` on
the same rows as the bound, on every backend and both paths.

`F.kl_div(log_softmax(s), log_softmax(t), log_target=True,
reduction="none").sum(-1)` in float32 is the reference a user compares
with. Its error is mostly float32 rounding of the two log-probabilities
(and of their normalizers: on torch a relative 3e-6 at 32000 classes of
logits of scale 5); every float32 implementation rounds them its own way,
so no backend matches it row for row, and two correct ones differ by a
few ulp of the value. The bound of every row of a case is therefore
`F.kl_div`'s largest error on the case's rows plus a few float32
roundings of the row's scale, `SLACK * eps32 * (1 + KL)`:

- fast path, 3: the two normalizers (each shifts the KL by about eps32)
  and the output. It computes `F.kl_div`'s terms, `P (log P - log Q)`;
  its former torch formula, `sum P log P - sum P log Q`, kept the
  rounding of two sums of the size of the entropy and would have needed
  4.5 to 9 at 1000 classes and more (see
  `test_the_bound_rejects_two_row_sums_that_cancel`).
- precise path, 8: exact (1e-13) near the teacher, but in a row far from
  it whose log-partitions are close (`|c| < 0.5`, see
  `keras_kd.ops._log_ratio`) its terms `Q phi(u)` take `P` as `Q e^u`,
  from a `Q` rounded at `|log Q|` up to 80 where `P` has its mass: up to
  5 ulp more than `F.kl_div` on rows with a KL of 10 to 30 (a relative
  2e-7), measured over 12 seeds of these cases on the three backends.
"""

import keras
import numpy as np
import pytest
from _cases import f32, kl64, log_softmax64
from _cases_keras import BACKEND, engine_path, np_  # noqa: F401

import keras_kd
from keras_kd import ops as kd
from keras_kd.ops import _rowdot
from keras_kd.ops._gradients import resolve_precise

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("engine_path")

EPS32 = float(np.finfo(np.float32).eps)
VOCABULARIES = (10, 1000, 32000, 128256)
KINDS = ("scale1", "scale5", "scale20", "near")
SLACK = {"fast": 3.0, "precise": 8.0}


def _rows(vocab, kind):
    """`(teacher, student)` float32 logits: independent rows of scale 1, 5
    or 20, or a teacher within 1e-3 of its student (KL about 5e-7)."""
    rng = np.random.default_rng([vocab, KINDS.index(kind)])
    shape = (4 if vocab > 100_000 else 16, vocab)
    if kind == "near":
        s = 2.0 * rng.standard_normal(shape)
        return f32(s + 1e-3 * rng.standard_normal(shape)), f32(s)
    scale = float(kind.removeprefix("scale"))
    t, s = (scale * rng.standard_normal(shape) for _ in range(2))
    return f32(t), f32(s)


def _kl_div_rows(t, s):
    """torch's own KL per row, float32 (entries with no target mass left
    out: `F.kl_div` gives NaN for `-inf` log-targets)."""
    F = torch.nn.functional
    log_p = F.log_softmax(torch.from_numpy(t), -1)
    log_q = F.log_softmax(torch.from_numpy(s), -1)
    rows = []
    for lq, lp in zip(log_q, log_p):
        keep = torch.isfinite(lp)
        value = F.kl_div(lq[keep], lp[keep], log_target=True, reduction="sum")
        rows.append(float(value))
    return np.asarray(rows)


def _bound(t, s, exact, path=None):
    """Per row: `F.kl_div`'s largest error on these rows, plus a few ulp
    (`SLACK` of the path `precise=None` takes, by default)."""
    if path is None:
        path = "precise" if resolve_precise(None) else "fast"
    worst = np.max(np.abs(_kl_div_rows(t, s) - exact))
    return worst + SLACK[path] * EPS32 * (1.0 + np.abs(exact))


def _value_and_student_grad(fn, t, s):
    """`fn(t, s)` per row and the gradient of its sum with respect to the
    student only, as a training step asks for them (on torch the teacher
    wants no gradient, which takes the frugal path)."""
    if BACKEND == "jax":
        import jax

        value, pullback = jax.vjp(lambda x: fn(t, x), keras.ops.array(s))
        return np_(value), np_(pullback(keras.ops.ones_like(value))[0])
    if BACKEND == "torch":
        student = torch.tensor(s, requires_grad=True)
        value = fn(torch.tensor(t), student)
        value.sum().backward()
        return np_(value.detach()), np_(student.grad)
    import tensorflow as tf

    student = tf.constant(s)
    with tf.GradientTape() as tape:
        tape.watch(student)
        value = fn(tf.constant(t), student)
    return np_(value), np_(tape.gradient(value, student))


def _check_grad(grad, t, s, what):
    """`d/ds sum KL(softmax(t) || softmax(s)) = Q - P`, finite and exact to
    a relative 1e-4 of the probabilities (torch's own `log_softmax`, which
    `F.kl_div` differentiates too, is off by a relative 1.2e-5 at 128256
    classes of scale 5)."""
    p, q = np.exp(log_softmax64(t)), np.exp(log_softmax64(s))
    assert np.isfinite(grad).all(), what
    error = np.abs(grad - (q - p))
    assert np.all(error <= 1e-4 * (p + q) + 1e-12), (what, error.max())


def _check(actual, exact, bound, what):
    error = np.abs(np.asarray(actual, np.float64) - exact)
    assert not np.isnan(actual).any(), what
    assert np.all(error <= bound), (what, error.max(), bound.min())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("vocab", VOCABULARIES)
def test_rows_are_as_exact_as_f_kl_div(vocab, kind):
    t, s = _rows(vocab, kind)
    exact = kl64(t, s)
    bound = _bound(t, s, exact)
    _check(np_(kd.kl_divergence(t, s)), exact, bound, "op")
    loss = keras_kd.losses.KLDivergence(reduction=None)
    _check(np_(loss(t, s)), exact, bound, "loss, reduction=None")
    value, grad = _value_and_student_grad(kd.kl_divergence, t, s)
    _check(value, exact, bound, "op under a gradient")
    _check_grad(grad, t, s, "op")


@pytest.mark.parametrize("kind", ["scale1", "near"])
def test_rows_in_several_chunks(kind, monkeypatch):
    # torch's CPU path forms `log P - log Q` a few rows at a time; three
    # rows per chunk here, so 16 rows take six chunks, the last of one.
    t, s = _rows(1000, kind)
    monkeypatch.setattr(_rowdot, "_CHUNK", 3 * 1000)
    exact = kl64(t, s)
    bound = _bound(t, s, exact)
    value, grad = _value_and_student_grad(kd.kl_divergence, t, s)
    _check(value, exact, bound, "chunked")
    _check_grad(grad, t, s, "chunked")
    # Leading axes: [batch, length, vocab] rows are chunked the same way.
    value, _ = _value_and_student_grad(
        kd.kl_divergence, t.reshape(4, 4, -1), s.reshape(4, 4, -1)
    )
    _check(value.reshape(-1), exact, bound, "chunked, [4, 4, vocab]")


def test_precise_rows_carry_no_normalizer_rounding():
    # At 32000 classes of logits of scale 5 torch's `log_softmax` rows sum
    # to 1 + 3e-6, and `F.kl_div` is off by that relative 3e-6 of the KL.
    # The precise path divides the sum out on torch (`_torch_mass` in
    # `keras_kd.ops._softmax_terms`), and XLA's sums have no such error.
    if not resolve_precise(None):
        pytest.skip("the precise path's accuracy")
    t, s = _rows(32000, "scale5")
    exact = kl64(t, s)
    worst = np.max(np.abs(_kl_div_rows(t, s) - exact))
    error = np.abs(np_(kd.kl_divergence(t, s)).astype(np.float64) - exact)
    assert error.max() <= 0.5 * worst, (error.max(), worst)


def test_masked_rows_stay_finite_and_exact():
    rng = np.random.default_rng(7)
    t, s = f32(5.0 * rng.normal(size=(2, 6, 1000)))
    both = rng.random(t.shape) < 0.3  # a masked vocabulary
    t[both], s[both] = -np.inf, -np.inf
    t[rng.random(t.shape) < 0.1] = -np.inf  # no target mass only
    t[-1], s[-1] = -np.inf, -np.inf  # a fully masked row
    exact = kl64(t, s)
    live = slice(0, -1)
    bound = _bound(t[live], s[live], exact[live])
    for what, fn in (
        ("op", kd.kl_divergence),
        ("loss", keras_kd.losses.KLDivergence(reduction=None)),
    ):
        value, grad = _value_and_student_grad(fn, t, s)
        _check(value[live], exact[live], bound, what)
        assert value[-1] == 0.0, what
        _check_grad(grad, t, s, what)
        assert not grad[-1].any(), what


def test_the_bound_rejects_two_row_sums_that_cancel():
    # The former torch fast path, `rowdot(P, log P) - rowdot(P, log Q)`
    # (einsum over blocks of 128 classes, then a sum over the blocks):
    # its error was up to 8x that of `F.kl_div`.
    F = torch.nn.functional

    def rowdot(x, y):
        blocks = x.reshape(x.shape[0], -1, 128)
        y = y.reshape(blocks.shape)
        return torch.einsum("rjk,rjk->rj", blocks, y).sum(-1)

    rejected = 0
    for vocab in (1024, 32000):
        t, s = _rows(vocab, "near")
        log_p = F.log_softmax(torch.from_numpy(t), -1)
        log_q = F.log_softmax(torch.from_numpy(s), -1)
        p = log_p.exp()
        two_sums = (rowdot(p, log_p) - rowdot(p, log_q)).double().numpy()
        exact = kl64(t, s)
        bound = _bound(t, s, exact, "fast")
        rejected += np.sum(np.abs(two_sums - exact) > bound)
    assert rejected >= 2
