"""Seeded inputs and float64 references shared by the loss tests.

The references are NumPy/SciPy in float64, computed in log space from the
same float32-rounded inputs the library sees, so a float32 result that is
exact to rounding agrees to a relative 1e-5. `-inf` entries are handled with
`np.where` on safe values: the suite turns RuntimeWarnings into errors.

Run as a script (`python tests/_cases.py OUT.npz`), it evaluates every
`keras_kd.ops` function on the fixed cases with the backend named by
`KERAS_BACKEND` and saves the results (see `test_backends_agree.py`).
"""

import itertools
import math
import sys

import numpy as np
from scipy import special

NEG_INF = -np.inf


# ------------------------------------------------------------------ inputs


def logit_pairs(seed=0):
    """Named `(teacher, student)` float32 logit pairs of shape `[rows, 7]`.

    Every case keeps the student finite wherever the teacher has mass, so
    every divergence is finite.
    """
    rng = np.random.default_rng(seed)
    shape = (5, 7)
    cases = {
        "random": (3.0 * rng.normal(size=shape), 3.0 * rng.normal(size=shape))
    }
    # Confident: entries of +-30 plus noise; at 1e4 also near-ties between
    # huge logits, where `x - logsumexp(x)` would lose three digits.
    for name, big in (("confident30", 30.0), ("confident1e4", 1e4)):
        t = big * rng.choice([-1.0, 0.0, 1.0], size=shape)
        s = big * rng.choice([-1.0, 0.0, 1.0], size=shape)
        t += rng.normal(size=shape)
        s += rng.normal(size=shape)
        t[0], s[0] = big - np.arange(7.0), big - np.arange(7.0)[::-1]
        t[1], s[1] = big, big
        t[1, 0] += 1.0
        cases[name] = (t, s)
    # Masked: the same entries are -inf in both (a masked vocabulary), and
    # the last row is fully masked.
    t, s = 3.0 * rng.normal(size=shape), 3.0 * rng.normal(size=shape)
    mask = rng.random(shape) < 0.3
    mask[:, 0] = False
    mask[-1] = True
    t[mask], s[mask] = NEG_INF, NEG_INF
    cases["masked"] = (t, s)
    return {k: (f32(a), f32(b)) for k, (a, b) in cases.items()}


def teacher_zeros_pair(seed=1):
    """Teacher logits with `-inf` entries (zero target probability) where the
    student is finite: only one-sided divergences are finite here."""
    rng = np.random.default_rng(seed)
    t, s = 2.0 * rng.normal(size=(5, 7)), 2.0 * rng.normal(size=(5, 7))
    t[:, 1::2] = NEG_INF
    return f32(t), f32(s)


def global_pointer_logits(seed=2, mask_value=NEG_INF, batch=2, heads=3, n=5):
    """GlobalPointer-like `[batch, heads, n, n]` teacher/student logits.

    The lower triangle (start > end) is `mask_value` in both, and the last
    example has its last two positions padded as well.
    """
    rng = np.random.default_rng(seed)
    shape = (batch, heads, n, n)
    t, s = 4.0 * rng.normal(size=shape), 4.0 * rng.normal(size=shape)
    lower = np.tril(np.ones((n, n), bool), k=-1)
    padded = np.zeros(shape, bool)
    padded[-1, :, -2:, :] = True
    padded[-1, :, :, -2:] = True
    masked = lower | padded
    t[masked], s[masked] = mask_value, mask_value
    labels = (rng.random(shape) < 0.2) & ~masked
    return f32(t), f32(s), labels.astype("float32")


def sparse_labels(seed=3, rows=(2, 3), classes=10, width=4, pad=-1):
    """Sparse positive indices with padding and repeats, and the dense 0/1
    labels they stand for."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, classes, size=rows + (width,))
    indices[..., -1] = pad
    first = (0,) * len(rows)
    indices[first + (1,)] = indices[first + (0,)]
    if pad == 0:
        indices[indices == 0] = 1
        indices[..., -1] = 0
    dense = np.zeros(rows + (classes,), "float32")
    for idx in np.ndindex(*rows):
        for j in indices[idx]:
            if (j > 0) if pad == 0 else (j >= 0):
                dense[idx + (j,)] = 1.0
    return indices.astype("int32"), dense


def extreme_pairs():
    """Named one-row `(teacher, student)` float32 logits at the ends of the
    float32 range: `x - max` overflows for opposite signs near 3.4e38, and
    subnormal logits must not be flushed (SPEC: exact for any finite
    logits). Every forward KL here is finite in float32."""
    big = float(np.finfo(np.float32).max)
    cases = {
        # true KL 3e38 (finite, huge)
        "opposite_3e38": ([3e38, 0.0, -3e38], [0.0, 0.0, 3e38]),
        # teacher certain, student uniform: log 2
        "opposite_2e38_vs_zeros": ([2e38, -2e38], [0.0, 0.0]),
        "identical_3e38": ([3e38, -3e38], [3e38, -3e38]),
        "float32_max": ([big, 0.0], [0.0, big]),
        # a masked class beside a huge one: 0, log 3 and log 2
        "masked_1e32_identical": ([1e32, NEG_INF, 0.0], [1e32, NEG_INF, 0.0]),
        "masked_1e32_vs_zeros": ([1e32, NEG_INF, 0.0], [0.0, 0.0, 0.0]),
        "masked_1e32_vs_masked": ([1e32, NEG_INF, 0.0], [0.0, NEG_INF, 0.0]),
        "tiny": ([1e-30, 0.0, -1e-30], [1e-38, 2e-45, 0.0]),
        "huge_ties": ([1e38, 1e38, -1e38], [1e38, 1e38 * (1 - 2e-7), 0.0]),
    }
    return {k: (f32([t]), f32([s])) for k, (t, s) in cases.items()}


def f32(x):
    return np.asarray(x, dtype="float32")


# ------------------------------------------------------- float64 references


def log_softmax64(x, temperature=1.0, from_logits=True):
    x = np.asarray(x, np.float64)
    if not from_logits:
        positive = x > 0
        x = np.where(positive, np.log(np.where(positive, x, 1.0)), NEG_INF)
    x = x / temperature
    flat = x.reshape(-1, x.shape[-1])
    out = np.full_like(flat, NEG_INF)
    alive = (flat > NEG_INF).any(-1)
    out[alive] = special.log_softmax(flat[alive], axis=-1)
    return out.reshape(x.shape)


def _p_log_ratio(lp, lq):
    mass = lp > NEG_INF
    lp_safe, lq_safe = np.where(mass, lp, 0.0), np.where(mass, lq, 0.0)
    return np.where(mass, np.exp(lp_safe) * (lp_safe - lq_safe), 0.0)


def kl64(t, s, temperature=1.0, from_logits=True):
    lp = log_softmax64(t, temperature, from_logits)
    lq = log_softmax64(s, temperature, from_logits)
    return temperature**2 * _p_log_ratio(lp, lq).sum(-1)


def entropy64(t, temperature=1.0):
    lp = log_softmax64(t, temperature)
    mass = lp > NEG_INF
    safe = np.where(mass, lp, 0.0)
    return -np.where(mass, np.exp(safe) * safe, 0.0).sum(-1)


def cross_entropy64(t, s, temperature=1.0):
    lp, lq = log_softmax64(t, temperature), log_softmax64(s, temperature)
    mass = lp > NEG_INF
    return -np.where(
        mass, np.exp(np.where(mass, lp, 0.0)) * np.where(mass, lq, 0.0), 0.0
    ).sum(-1)


def sparse_ce64(labels, logits):
    """`-log softmax(logits)[label]` per row."""
    log_q = log_softmax64(logits)
    labels = np.asarray(labels)
    return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]


def symmetric_kl64(t, s, temperature=1.0):
    return kl64(t, s, temperature) + kl64(s, t, temperature)


def symmetric_kl_logit_form64(t, s):
    """`sum((softmax(s) - softmax(t)) * (s - t))`, finite logits only."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    p, q = special.softmax(t, axis=-1), special.softmax(s, axis=-1)
    return ((q - p) * (s - t)).sum(-1)


def jsd64(t, s, beta, temperature=1.0):
    lp, lq = log_softmax64(t, temperature), log_softmax64(s, temperature)
    lm = np.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    value = beta * _p_log_ratio(lp, lm).sum(-1)
    value += (1.0 - beta) * _p_log_ratio(lq, lm).sum(-1)
    return temperature**2 * value


def global_pointer64(t, s, temperature=1.0, axes=(-2, -1)):
    """`T**2 * sum((sigmoid(s/T) - sigmoid(t/T)) * (s/T - t/T))`."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    masked = (t == NEG_INF) | (s == NEG_INF)
    t = np.where(masked, 0.0, t) / temperature
    s = np.where(masked, 0.0, s) / temperature
    d = (special.expit(s) - special.expit(t)) * (s - t)
    return temperature**2 * np.where(masked, 0.0, d).sum(axes)


def global_pointer_two_class64(t, s, axes=(-2, -1)):
    """The same divergence as a sum of 2-class symmetric KLs, written with
    `log_expit` (log-probabilities of `[sigmoid(x), 1 - sigmoid(x)]`)."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    masked = (t == NEG_INF) | (s == NEG_INF)
    t, s = np.where(masked, 0.0, t), np.where(masked, 0.0, s)
    total = 0.0
    for sign in (1.0, -1.0):
        lp, lq = special.log_expit(sign * t), special.log_expit(sign * s)
        total = total + (np.exp(lq) - np.exp(lp)) * (lq - lp)
    return np.where(masked, 0.0, total).sum(axes)


def mlce64(labels, logits, axes=(-1,)):
    """`log(1 + sum_neg e^s) + log(1 + sum_pos e^-s)` over `axes`."""
    logits = np.asarray(logits, np.float64)
    usable = logits > NEG_INF
    safe = np.where(usable, logits, 0.0)
    positive = np.asarray(labels) > 0.5
    neg = np.where(usable & ~positive, safe, NEG_INF)
    pos = np.where(usable & positive, -safe, NEG_INF)
    axes = tuple(a % logits.ndim for a in axes)
    keep = [d for i, d in enumerate(logits.shape) if i not in axes]
    order = [i for i in range(logits.ndim) if i not in axes] + list(axes)

    def log1p_sum_exp(x):
        x = np.transpose(x, order).reshape(keep + [-1])
        zero = np.zeros(x.shape[:-1] + (1,))
        return special.logsumexp(np.concatenate([zero, x], -1), axis=-1)

    return log1p_sum_exp(neg) + log1p_sum_exp(pos)


def dkd64(t, s, labels, alpha=1.0, beta=8.0, temperature=1.0):
    """TCKD, NCKD and DKD per row in float64 log space (valid labels)."""
    lp, lq = log_softmax64(t, temperature), log_softmax64(s, temperature)
    rows = np.arange(len(labels))

    def binary(log_p):
        others = log_p.copy()
        others[rows, labels] = NEG_INF
        rest = special.logsumexp(others, axis=-1)
        return np.stack([log_p[rows, labels], rest], axis=-1)

    def non_target(z):
        z = np.array(z, np.float64)
        z[rows, labels] = NEG_INF
        return log_softmax64(z, temperature)

    t2 = temperature**2
    tckd = t2 * _p_log_ratio(binary(lp), binary(lq)).sum(-1)
    nckd = t2 * _p_log_ratio(non_target(t), non_target(s)).sum(-1)
    return tckd, nckd, alpha * tckd + beta * nckd


def rdrop64(labels, logits, alpha, from_logits=True):
    """R-Drop loss per row for one-hot labels, in float64."""
    lq = log_softmax64(logits, from_logits=from_logits)
    labels = np.asarray(labels, np.float64)
    mass = labels > 0
    ce = -np.where(mass, labels * np.where(mass, lq, 0.0), 0.0).sum(-1)
    a, b = lq[0::2], lq[1::2]
    pair = _p_log_ratio(a, b).sum(-1) + _p_log_ratio(b, a).sum(-1)
    return ce.mean() + alpha * pair.mean() / 4.0


# --------------------------------------------- cross-backend result table


def backend_results():
    """Every `keras_kd.ops` function on the fixed cases, as NumPy arrays."""
    import keras

    from keras_kd import ops as kd

    def np_(x):
        return keras.ops.convert_to_numpy(x).astype(np.float64)

    out = {}
    for name, (t, s) in logit_pairs().items():
        for temp in (1.0, 2.5):
            key = f"{name}_T{temp}"
            # Both paths explicitly: `precise=None` picks a different one
            # on torch than on JAX and TensorFlow.
            for precise in (True, False):
                path = f"{key}_{'precise' if precise else 'fast'}"
                kwargs = {"temperature": temp, "precise": precise}
                out[f"kl_{path}"] = np_(kd.kl_divergence(t, s, **kwargs))
                out[f"sym_{path}"] = np_(
                    kd.symmetric_kl_divergence(t, s, **kwargs)
                )
                for beta in (0.0, 0.3, 0.5, 1.0):
                    out[f"jsd{beta}_{path}"] = np_(
                        kd.jensen_shannon_divergence(t, s, beta, **kwargs)
                    )
            out[f"ce_{key}"] = np_(kd.cross_entropy(t, s, temperature=temp))
            out[f"h_{key}"] = np_(kd.entropy(t, temperature=temp))
            out[f"logp_{key}"] = np_(kd.log_probabilities(s, temperature=temp))
            # The fast GlobalPointer path is plain sigmoids, whose rounding
            # differs between backends (`test_ops_multilabel.py` bounds it).
            out[f"gp_{key}"] = np_(
                kd.global_pointer_kl_divergence(t, s, temp, precise=True)
            )
            out[f"bsym_{key}"] = np_(
                kd.binary_symmetric_kl_divergence(t, s, temp, precise=True)
            )
        labels = (t > 0).astype("float32")
        out[f"mlce_{name}"] = np_(
            kd.multilabel_categorical_crossentropy(labels, s)
        )
        pairs = np.repeat(s[:4], 2, axis=0) + np.tile([[0.0], [0.5]], (4, 1))
        for precise in (True, False):
            out[f"paired_{name}_{precise}"] = np_(
                kd.paired_symmetric_kl_divergence(f32(pairs), precise=precise)
            )
        if name in ("random", "confident30"):
            labels = np.arange(len(t)) % t.shape[-1]
            for precise in (True, False):
                out[f"dkd_{name}_{precise}"] = np_(
                    kd.decoupled_kd(
                        t, s, labels, 1.0, 8.0, 2.5, precise=precise
                    )
                )
    for name, (t, s) in extreme_pairs().items():
        for temp, precise in itertools.product((1.0, 2.5), (True, False)):
            key = f"{name}_T{temp}"
            path = f"{key}_{'precise' if precise else 'fast'}"
            kwargs = {"temperature": temp, "precise": precise}
            out[f"xkl_{path}"] = np_(kd.kl_divergence(t, s, **kwargs))
            out[f"xrkl_{path}"] = np_(kd.kl_divergence(s, t, **kwargs))
            out[f"xsym_{path}"] = np_(
                kd.symmetric_kl_divergence(t, s, **kwargs)
            )
            out[f"xjsd_{path}"] = np_(
                kd.jensen_shannon_divergence(t, s, **kwargs)
            )
            out[f"xlogp_{key}"] = np_(kd.log_probabilities(t, temperature=temp))
    t, s = teacher_zeros_pair()
    out["kl_teacher_zeros"] = np_(kd.kl_divergence(t, s))
    probs = np.exp(log_softmax64(t)).astype("float32")
    out["kl_probs"] = np_(
        kd.kl_divergence(probs, np.full_like(probs, 1 / 6), from_logits=False)
    )
    for mask_value in (NEG_INF, -1e12):
        t, s, labels = global_pointer_logits(mask_value=mask_value)
        out[f"gp4_{mask_value}"] = np_(
            kd.global_pointer_kl_divergence(t, s, precise=True)
        )
        out[f"mlce4_{mask_value}"] = np_(
            kd.multilabel_categorical_crossentropy(labels, s)
        )
    indices, _ = sparse_labels()
    logits = 3.0 * np.random.default_rng(4).normal(size=(2, 3, 10))
    out["sparse_mlce"] = np_(
        kd.sparse_multilabel_categorical_crossentropy(indices, f32(logits))
    )
    return out


if __name__ == "__main__":
    np.savez(sys.argv[1], **backend_results())
