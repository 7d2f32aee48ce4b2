"""Per-chunk math of the top-k ("bucketed") distillation loss.

A cached teacher keeps, per token, its `k` most likely ids with their
log-probabilities and one tail bucket holding the rest of its mass. The
loss compares it with the student's distribution over the same `k + 1`
buckets: the student's probabilities of the `k` ids and its tail mass.
Everything here works on one chunk `[chunk, vocab]` of student logits and
returns per-token values and the gradient with respect to the student's
scaled logits; the chunk engine (`_chunk_engine.py`, with the
`TopKTeacher` of `_chunk_teachers.py`) runs the chunks. Nothing is
differentiated by the backend, so a `where` whose unused branch is NaN or
infinite is harmless. `top_k_buckets` makes the buckets from a chunk of
the teacher's logits (`keras_kd.ops.fused_linear_top_k`).

Notation (one row): `x = (s - max s) / T` (student), `Q = softmax(x)`,
buckets `b = 1..k` (the ids) and `0` (the tail), `q_b` the student's and
`P_b` the teacher's bucket probabilities, `u_b = log P_b - log q_b`.

```
KL = sum_b P_b u_b = sum_b q_b phi(u_b),   phi(u) = 1 + (u - 1) e^u
dKL/dx_j = Q_j - P_i                  j = id_i (a top-k id)
dKL/dx_j = Q_j - P_0 Q_j / q_0        j in the tail
         = -Q_j expm1(u_b)            both, b the bucket of j
```

`q_0` is a log-sum-exp over the tail logits (the k ids masked out), never
`1 - sum q_i`, which loses every digit when the tail is small.
"""

import math

from keras import ops

from keras_kd.ops._log_ratio import SERIES_BELOW, series


def place(ids, values, vocab):
    """`[chunk, vocab]` zeros with `values` `[chunk, k]` at `ids`.

    `scatter_update` into zeros: `ops.scatter` is a Python loop over the
    entries on torch, and a one-hot comparison would hold a
    `[chunk, k, vocab]` tensor.
    """
    rows, k = ids.shape[0], ids.shape[1]
    # A broadcast, not `ops.repeat`: torch.compile cannot trace a repeat
    # count given as a tensor (Keras' torch `repeat` makes one).
    row_ids = ops.broadcast_to(
        ops.arange(rows, dtype="int32")[:, None], (rows, k)
    )
    row_ids = ops.reshape(row_ids, (-1,))
    coords = ops.stack([row_ids, ops.reshape(ids, (-1,))], axis=1)
    zeros = ops.zeros((rows, vocab), values.dtype)
    return ops.scatter_update(zeros, coords, ops.reshape(values, (-1,)))


def top_k_mask(ids, vocab):
    """`[chunk, vocab]` bool: True at each row's `ids` `[chunk, k]`."""
    return place(ids, ops.ones(ids.shape, "float32"), vocab) > 0


def tail_log_sum_exp(x, in_top):
    """`(lse, e, total)`: `lse = log sum_{j not in top} exp(x_j)` per row
    (`-inf` for an empty tail), and `e / total` the tail's softmax
    `[chunk, vocab]` (0 on the top-k ids).

    The tail's own maximum is subtracted before the exponential: the tail
    may lie hundreds of nats below the row's maximum, where exponentials
    shifted by that maximum would all underflow to 0.
    """
    masked = ops.where(in_top, ops.full_like(x, -math.inf), x)
    top = ops.amax(masked, axis=-1, keepdims=True)
    top = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    e = ops.exp(masked - top)
    total = ops.sum(e, axis=-1, keepdims=True)
    # log(0) = -inf: a tail without entries (k = vocab) has no mass.
    return ops.squeeze(top + ops.log(total), -1), e, total


def top_k_buckets(x, k):
    """The `k + 1` buckets of `softmax(x)` per row of `x` `[chunk, vocab]`:
    `(log_probs [chunk, k], ids [chunk, k], tail [chunk])`, the `k`
    largest log-probabilities (largest first), their int32 ids, and the
    log of the remaining mass (`-inf` when the top `k` hold all of it).

    The tail is a log-sum-exp over the other entries: `log1p(-sum p)`
    would lose every digit of a tail below ~1e-7.
    """
    lse = ops.logsumexp(x, axis=-1)
    values, ids = ops.top_k(x, k)
    ids = ops.cast(ids, "int32")
    tail, _, _ = tail_log_sum_exp(x, top_k_mask(ids, x.shape[-1]))
    return values - ops.expand_dims(lse, -1), ids, tail - lse


def _log_normalize(log_values):
    """`log_values - logsumexp(log_values)` per row (k + 1 buckets)."""
    top = ops.amax(log_values, axis=-1, keepdims=True)
    top = ops.where(ops.isfinite(top), top, ops.zeros_like(top))
    total = ops.sum(ops.exp(log_values - top), axis=-1, keepdims=True)
    return log_values - (top + ops.log(total))


def bucket_kl_terms(half, total, q, scale, top_log_probs, ids, tail_log_prob):
    """Per-row KL of the bucketed teacher from the bucketed student, and
    its gradient with respect to the student's scaled logits `x = s / T`.

    The teacher's `k + 1` bucket probabilities are normalized to sum to 1
    (cached float16 values carry a relative rounding of ~5e-4 each), so the
    value is a true KL (>= 0) and the gradient sums to 0 over the vocab.

    Args:
        half: `(s - max s) / 2` of the student's logits `[chunk, vocab]`.
        total: `sum exp(half * scale)` `[chunk, 1]`.
        q: the student's softmax `exp(half * scale) / total`.
        scale: `2 / T`.
        top_log_probs: the teacher's top-k log-probabilities `[chunk, k]`.
        ids: their ids `[chunk, k]`, distinct within a row, in range.
        tail_log_prob: the log of the teacher's remaining mass `[chunk]`
            (`-inf` when the top k hold all of it).

    Returns:
        `(value [chunk], grad [chunk, vocab])`.
    """
    vocab = q.shape[-1]
    x = half * scale
    log_total = ops.log(total)
    in_top = top_k_mask(ids, vocab)
    tail_lse, tail_e, tail_total = tail_log_sum_exp(x, in_top)
    log_q = ops.concatenate(
        [
            ops.take_along_axis(x, ids, axis=-1) - log_total,
            ops.expand_dims(tail_lse, -1) - log_total,
        ],
        axis=-1,
    )
    log_p = _log_normalize(
        ops.concatenate(
            [top_log_probs, ops.expand_dims(tail_log_prob, -1)], axis=-1
        )
    )
    qb, pb = ops.exp(log_q), ops.exp(log_p)
    # u is NaN only where both buckets are empty (-inf - -inf); those
    # entries take the `no_mass` branch below.
    u = log_p - log_q
    small = ops.abs(u) < SERIES_BELOW
    u_small = ops.where(small, u, ops.zeros_like(u))
    psi = series(u_small, "psi")
    # P - q = q expm1(u), with expm1(u) = u + psi(u) near 0: exact for a
    # student close to its teacher, where P - q cancels.
    p_minus_q = ops.where(small, qb * (u_small + psi), pb - qb)
    terms = ops.where(
        small, qb * (u_small * (u_small + psi) - psi), u * pb - p_minus_q
    )
    # 0 log 0 = 0: a bucket the teacher gives no mass adds q_b, its share
    # of sum_b (q_b - P_b) = 0.
    no_mass = log_p == -math.inf
    terms = ops.where(no_mass, qb, terms)
    p_minus_q = ops.where(no_mass, -qb, p_minus_q)
    value = ops.sum(terms, axis=-1)
    k = ids.shape[-1]
    # Top-k entries: Q_j - P_i = -(P - q)_i, placed at the ids.
    top_grad = place(ids, -p_minus_q[:, :k], vocab)
    # Tail entries: -Q_j expm1(u_0) near the teacher; Q_j - P_0 Q_j / q_0
    # elsewhere, with Q_j / q_0 the tail softmax (finite even where q_0
    # underflows to 0). An empty bucket has u_0 = -inf or NaN: far. Both
    # are `Q_j a - softmax_j b` with row-wise (a, b): no [chunk, vocab]
    # `where` (slow on torch) for the choice.
    small_tail = small[:, k:]
    one = ops.ones_like(small_tail, dtype=q.dtype)
    a = ops.where(small_tail, -(u_small[:, k:] + psi[:, k:]), one)
    b = ops.where(small_tail, one * 0.0, pb[:, k:])
    b = b / ops.where(tail_total > 0, tail_total, ops.ones_like(tail_total))
    tail_grad = q * a - tail_e * b
    return value, ops.where(in_top, top_grad, tail_grad)
