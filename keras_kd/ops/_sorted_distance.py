"""Distances between distributions over two different vocabularies: ULD's
sorted L1 and the hybrid of an exact divergence on the ids both
vocabularies share with the sorted L1 of the rest.

The per-row math (`distance_terms`) works on log-probabilities, possibly
scaled by a group's continuation probability (so the rows sum to at most
1), and returns each row's value with its gradient with respect to the
student's log-probabilities. The fused chunked op
(`_fused_cross_vocab.py`) and the dense functions on logits below share
it.

Notation (one row): `a` the student's probabilities over its vocabulary
`V_s`, `b` the teacher's over `V_t`.

```
sorted L1:  sum_k |sort(a)_k - sort(b)_k|    (descending, zero-padded)
hybrid:     GJSD_beta(b[m_t] || a[m_s]) + sorted L1(a[rest_s], b[rest_t])
```

`m_s, m_t` are the matched ids (pairs of tokens that stand for the same
text), `rest` the other ids of each side. The generalized JSD of the
matched entries is not renormalized: with `P = b[m_t]`, `Q = a[m_s]`,
`M = beta P + (1 - beta) Q`, it is
`sum beta P log(P / M) + (1 - beta) Q log(Q / M)`, each entry
non-negative by the convexity of `x log x`; at `beta = 0` and `1` it is
the generalized KL `sum P log(P / Q) - P + Q` (and the reverse), which is
never negative either and equals the KL when both sides sum to 1. With a
shared vocabulary every id is matched and the hybrid is the JSD of
`jensen_shannon_divergence` (the forward and reverse KL at the ends).
The sorted L1 of the rest is computed by zeroing the matched entries and
sorting whole rows: the zeros sort last and pair with zeros or with the
other side's tail, which is what the zero padding does.
"""

import numpy as np
from keras import ops

from keras_kd import _checks
from keras_kd.ops._core import (
    _as_float,
    _constant,
    _finite_log_probabilities,
    _lowest,
    _times_t_squared,
    compute_dtype,
    validate_beta,
    validate_temperature,
)
from keras_kd.ops._softmax_terms import _log_mixture
from keras_kd.ops._top_k_buckets import place

DISTANCES = ("universal", "hybrid")


def _descending(x):
    return ops.flip(ops.sort(x, axis=-1), axis=-1)


def _pad_columns(x, width):
    extra = width - x.shape[-1]
    if extra == 0:
        return x
    return ops.pad(x, [[0, 0]] * (len(x.shape) - 1) + [[0, extra]])


def sorted_l1_terms(a, b, gradient=True):
    """`(sum |sort(a) - sort(b)|, a * d/da)` per row; `a` `[..., V_s]` and
    `b` `[..., V_t]` non-negative, the shorter zero-padded. The second is
    `None` without `gradient` (a plain sort then suffices)."""
    width = max(a.shape[-1], b.shape[-1])
    b_sorted = _pad_columns(_descending(b), width)
    if not gradient:
        diff = _pad_columns(_descending(a), width) - b_sorted
        return ops.sum(ops.abs(diff), axis=-1), None
    order = ops.flip(ops.argsort(a, axis=-1), axis=-1)
    a_sorted = ops.take_along_axis(a, order, axis=-1)
    diff = _pad_columns(a_sorted, width) - b_sorted
    value = ops.sum(ops.abs(diff), axis=-1)
    # d/da_v = sign(sort(a) - sort(b)) at v's rank: the inverse permutation
    # of `order` gives each id its rank.
    slope = ops.sign(diff[..., : a.shape[-1]])
    # Each id takes the slope at its rank: a scatter by `order` (cheaper
    # than sorting `order` for its inverse).
    return value, a * place(order, slope, a.shape[-1])


def matched_terms(log_p, log_q, beta):
    """Generalized JSD of the (unnormalized) teacher `P` and student `Q`
    entries from their finite logs, and `Q * d/dQ`, per row."""
    p, q = ops.exp(log_p), ops.exp(log_q)
    if beta == 0.0:
        value = p * (log_p - log_q) - p + q
        return ops.sum(value, axis=-1), q - p
    if beta == 1.0:
        value = q * (log_q - log_p) - q + p
        return ops.sum(value, axis=-1), q * (log_q - log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    to_q = q * (log_q - log_m)
    value = beta * p * (log_p - log_m) + (1.0 - beta) * to_q
    return ops.sum(value, axis=-1), (1.0 - beta) * to_q


class VocabularyMatch:
    """The constant index arrays of a vocabulary match: which student and
    teacher ids stand for the same token, where each student id's matched
    entry sits, and which ids are left to the sorted L1."""

    def __init__(self, student_ids, teacher_ids, student_vocab, teacher_vocab):
        self.size = len(student_ids)
        slot = np.full((student_vocab,), self.size, "int32")
        slot[student_ids] = np.arange(self.size, dtype="int32")
        rest_s = np.ones((student_vocab,), "float32")
        rest_s[student_ids] = 0.0
        rest_t = np.ones((teacher_vocab,), "float32")
        rest_t[teacher_ids] = 0.0
        self.arrays = {
            "student_ids": np.asarray(student_ids, "int32"),
            "teacher_ids": np.asarray(teacher_ids, "int32"),
            "student_slot": slot,
            "student_rest": rest_s,
            "teacher_rest": rest_t,
        }

    def tensors(self, dtype):
        return {
            k: ops.convert_to_tensor(
                v, "int32" if v.dtype.kind == "i" else dtype
            )
            for k, v in self.arrays.items()
        }


def vocabulary_match(matched_ids, student_vocab, teacher_vocab):
    """A checked `VocabularyMatch` from `(student_ids, teacher_ids)`, or
    the identity match of one shared vocabulary for `None`."""
    if matched_ids is None:
        if student_vocab != teacher_vocab:
            raise _checks.invalid(
                "matched_ids",
                "the matched `(student_ids, teacher_ids)` pairs when the "
                f"vocabularies differ (student {student_vocab} ids, teacher "
                f"{teacher_vocab}): see `keras_kd.match_vocabularies`",
                matched_ids,
            )
        ids = np.arange(student_vocab)
        return VocabularyMatch(ids, ids, student_vocab, teacher_vocab)
    try:
        student_ids, teacher_ids = (
            np.asarray(ops.convert_to_numpy(x)) for x in matched_ids
        )
    except (TypeError, ValueError):
        raise _checks.invalid(
            "matched_ids", "a pair `(student_ids, teacher_ids)`", matched_ids
        ) from None
    ok = (
        student_ids.ndim == teacher_ids.ndim == 1
        and student_ids.shape == teacher_ids.shape
        and student_ids.dtype.kind in "iu"
        and teacher_ids.dtype.kind in "iu"
    )
    ok = ok and (
        student_ids.size == 0
        or (
            0 <= student_ids.min()
            and student_ids.max() < student_vocab
            and 0 <= teacher_ids.min()
            and teacher_ids.max() < teacher_vocab
        )
    )
    unique = ok and (
        len(np.unique(student_ids)) == len(student_ids)
        and len(np.unique(teacher_ids)) == len(teacher_ids)
    )
    if not unique:
        raise _checks.invalid(
            "matched_ids",
            "two 1-D integer arrays of equal length, of distinct ids below "
            f"the vocabulary sizes ({student_vocab} student, {teacher_vocab} "
            "teacher)",
            matched_ids,
        )
    return VocabularyMatch(
        student_ids, teacher_ids, student_vocab, teacher_vocab
    )


def distance_terms(log_a, log_b, distance, beta, match, gradient=True):
    """`(value, h)` per row: the distance between the student's `exp(log_a)`
    and the teacher's `exp(log_b)`, and `h = a * d value / d a` (the
    gradient with respect to `log_a`; `None` without `gradient`).

    `match` is `VocabularyMatch.tensors(...)` for the hybrid, else `None`.
    The logs are finite (no mass is the dtype's lowest value)."""
    a, b = ops.exp(log_a), ops.exp(log_b)
    if distance == "universal":
        return sorted_l1_terms(a, b, gradient)
    log_q = ops.take(log_a, match["student_ids"], axis=-1)
    log_p = ops.take(log_b, match["teacher_ids"], axis=-1)
    exact, h_exact = matched_terms(log_p, log_q, beta)
    rest, h_rest = sorted_l1_terms(
        a * match["student_rest"], b * match["teacher_rest"], gradient
    )
    if not gradient:
        return exact + rest, None
    # Each student id takes its matched entry's gradient (a zero column
    # appended for the unmatched ids).
    h_exact = ops.concatenate(
        [h_exact, ops.zeros_like(h_exact[..., :1])], axis=-1
    )
    return exact + rest, h_rest + ops.take(
        h_exact, match["student_slot"], axis=-1
    )


def floor_logs(x):
    """`x` with anything below the dtype's lowest value at that value
    (a log-probability plus a log-scale can round past it)."""
    lowest = _constant(_lowest(x.dtype), x.dtype)
    return ops.where(x < lowest, lowest, x)


# ----------------------------------------------------------- on logits


def _logit_pair(y_true, y_pred):
    y_true, y_pred = _as_float(y_true), _as_float(y_pred)
    lead_t, lead_p = tuple(y_true.shape[:-1]), tuple(y_pred.shape[:-1])
    same = len(lead_t) == len(lead_p) and all(
        a is None or b is None or a == b for a, b in zip(lead_t, lead_p)
    )
    if not same or not y_true.shape or not y_pred.shape:
        raise ValueError(
            "Invalid value for arguments `y_true` and `y_pred`. Expected "
            "logits with the same leading shape (the vocabularies, the "
            f"last axis, may differ). Received: y_true.shape="
            f"{tuple(y_true.shape)}, y_pred.shape={tuple(y_pred.shape)}"
        )
    dtype = compute_dtype((y_true, y_pred))
    return ops.cast(y_true, dtype), ops.cast(y_pred, dtype)


def _on_logits(y_true, y_pred, temperature, distance, beta, matched_ids):
    temperature = validate_temperature(temperature)
    y_true, y_pred = _logit_pair(y_true, y_pred)
    match = None
    if distance == "hybrid":
        match = vocabulary_match(
            matched_ids, y_pred.shape[-1], y_true.shape[-1]
        ).tensors(y_pred.dtype)
    log_b = _finite_log_probabilities(y_true, True, temperature, -1)
    log_a = _finite_log_probabilities(y_pred, True, temperature, -1)
    value, _ = distance_terms(log_a, log_b, distance, beta, match, False)
    return _times_t_squared(value, temperature)


def universal_logit_distance(y_true, y_pred, temperature=1.0):
    """Universal logit distance (ULD): the L1 distance of the two sorted
    probability vectors, for a teacher and a student over different
    vocabularies.

    Formula:

    ```
    P = softmax(y_true / T)   # [..., V_t]
    Q = softmax(y_pred / T)   # [..., V_s]
    loss = T**2 * sum_k |sort(Q)_k - sort(P)_k|   # descending, zero-padded
    ```

    Sorting forgets which token is which, so any two vocabularies compare;
    the value lies in `[0, 2 T**2]`. Rows are paired by position (see
    `keras_kd.align_tokens` for aligning two tokenizations of one text).
    A NaN in a row gives NaN for that row; masked (`-inf`) logits carry no
    mass.

    Args:
        y_true: the teacher's logits `[..., V_t]`.
        y_pred: the student's logits `[..., V_s]`, the same leading shape.
        temperature: softening temperature `T > 0`.

    Returns:
        The distance per row, the last axis removed.

    Reference:
        Boizard et al. Towards Cross-Tokenizer Distillation: the Universal
        Logit Distillation Loss for LLMs. 2024.
        https://arxiv.org/abs/2402.12030
    """
    return _on_logits(y_true, y_pred, temperature, "universal", 0.5, None)


def hybrid_logit_distance(
    y_true, y_pred, beta=0.5, temperature=1.0, matched_ids=None
):
    """Hybrid distance of a teacher and a student over different
    vocabularies: the generalized Jensen-Shannon divergence on the ids both
    vocabularies share, ULD's sorted L1 on the rest.

    Formula:

    ```
    P = softmax(y_true / T), Q = softmax(y_pred / T)  # full vocabularies
    p, q = P[teacher_ids], Q[student_ids]             # matched, as they are
    M = beta p + (1 - beta) q
    loss = T**2 * (sum beta p log(p / M) + (1 - beta) q log(q / M)
                   + sum_k |sort(Q[rest])_k - sort(P[rest])_k|)
    ```

    The matched probabilities are not renormalized. At `beta = 0` the
    matched part is the generalized KL `sum p log(p / q) - p + q`, at
    `beta = 1` the reverse; with one shared vocabulary (`matched_ids=None`
    and equal sizes) the value is `jensen_shannon_divergence(y_true,
    y_pred, beta)`, the forward and reverse KL at the ends.

    Args:
        y_true: the teacher's logits `[..., V_t]`.
        y_pred: the student's logits `[..., V_s]`, the same leading shape.
        beta: the mixing weight in `[0, 1]`.
        temperature: softening temperature `T > 0`.
        matched_ids: `(student_ids, teacher_ids)`, two integer arrays of
            equal length pairing the ids whose tokens are the same text
            (`keras_kd.match_vocabularies` computes it from two
            tokenizers), or
            `None` for one shared vocabulary.

    Returns:
        The distance per row, the last axis removed.
    """
    beta = validate_beta(beta)
    return _on_logits(y_true, y_pred, temperature, "hybrid", beta, matched_ids)
