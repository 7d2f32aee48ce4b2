"""Distillation from a cached top-k teacher, from the student's hidden
states: the student's `[tokens, vocab]` logits are never built.

The teacher is given per token by its `k` largest log-probabilities, their
ids, and the log of its remaining mass (one tail bucket), as
`keras_kd.cache_causal_lm_top_k` stores them. The loss is the exact KL
between the teacher's `k + 1` buckets and the student's distribution over
the same buckets (per-chunk math: `_top_k_buckets.py`). Chunks, layouts,
masks, dtypes and gradients follow `fused_linear_divergence`; the chunk
loop is the same (`_fused_linear_loop.py`).
"""

import math

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops import _fused_linear_args as args
from keras_kd.ops import _fused_linear_loop as loop
from keras_kd.ops._core import validate_temperature
from keras_kd.ops._top_k_buckets import TopKChunk

# A cached temperature is float32; one given as a Python float may differ
# from it by rounding.
_TEMPERATURE_RTOL = 1e-6


def _fused_top_k_loss(inputs, cfg):
    """`[total, cross_entropy, divergence]` with the custom gradient; as
    `_fused_linear_loop.fused_loss`, over the cached teacher's arrays."""
    names = [k for k, v in inputs.items() if ops.is_tensor(v)]
    dtype = loop._compute_dtype(
        [inputs["student_hidden"], inputs["student_kernel"]]
    )

    def compute(tensors, gradients):
        given = dict(inputs, **dict(zip(names, tensors)))
        hidden = given["student_hidden"]
        width = hidden.shape[-1]
        flat = ops.cast(ops.reshape(hidden, (-1, width)), dtype)
        kernel = ops.cast(given["student_kernel"], dtype)
        k = given["log_probs"].shape[-1]
        log_probs = ops.cast(ops.reshape(given["log_probs"], (-1, k)), dtype)
        ids = ops.cast(ops.reshape(given["ids"], (-1, k)), "int32")
        tail = ops.cast(ops.reshape(given["tail"], (-1,)), dtype)
        t, a = given["temperature"], given["alpha"]
        t = ops.cast(t, dtype) if ops.is_tensor(t) else t
        a = ops.cast(a, dtype) if ops.is_tensor(a) else a
        weights, labels = loop.token_weights_and_labels(
            given["mask"], given["labels"], ops.shape(flat)[0], dtype
        )
        chunk = TopKChunk(cfg, kernel, t, a, gradients)
        d_hidden, d_kernel, sums = loop._run_chunks(
            chunk,
            cfg["chunk_size"],
            (flat, log_probs, ids, tail, weights, labels),
        )
        ce, div = sums[0], sums[1] * (t * t)
        out = ops.stack([a * ce + (1.0 - a) * div, ce, div])
        cached = given["teacher_temperature"]
        if cached is None:
            return out, d_hidden, d_kernel
        # A cache made at another temperature: NaN and no update (the
        # teacher's buckets at T cannot be recovered from those at T').
        cached = ops.cast(cached, dtype)
        same = ops.all(ops.abs(cached - t) <= _TEMPERATURE_RTOL * ops.abs(t))
        out = ops.where(same, out, ops.full_like(out, math.nan))
        keep = ops.cast(same, dtype)
        if gradients:
            d_hidden, d_kernel = d_hidden * keep, d_kernel * keep
        return out, d_hidden, d_kernel

    return loop.with_student_gradients(compute, [inputs[k] for k in names])


def _teacher_temperature(value, temperature):
    """A cached temperature: checked here when both are plain numbers,
    else passed on as a tensor (checked inside the loss)."""
    if value is None:
        return None
    number = _checks.as_python_number(value)
    if number is None or not isinstance(temperature, float):
        return args.tensor(value)
    if not abs(number - temperature) <= _TEMPERATURE_RTOL * temperature:
        raise _checks.invalid(
            "temperature",
            f"the temperature the teacher was cached at ({number:g}): a "
            "top-k cache holds the teacher's distribution at one "
            "temperature",
            temperature,
        )
    return None


def _call(student_hidden, student_kernel, teacher, labels, mask, options):
    """Checks every argument, then runs the fused loop."""
    temperature = validate_temperature(options["temperature"])
    if not isinstance(temperature, float):
        temperature = args.tensor(temperature)
    chunk_size = options["chunk_size"]
    if chunk_size is not None:
        chunk_size = _checks.integer("chunk_size", chunk_size, low=1)
    layout = options["student_kernel_layout"]
    hidden, kernel = args.tensor(student_hidden), args.tensor(student_kernel)
    vocab = args.kernel_vocab("student_kernel", kernel, layout, hidden)
    log_probs, ids, tail = (args.tensor(x) for x in teacher)
    args.same_leading("teacher_top_k_log_probs", log_probs, hidden, 1)
    args.same_leading("teacher_top_k_ids", ids, hidden, 1)
    args.same_leading("teacher_tail_log_prob", tail, hidden)
    k = log_probs.shape[-1]
    if ids.shape[-1] != k:
        raise args.shape_error(
            "teacher_top_k_ids", f"k = {k} ids per token", ids
        )
    if k is not None and vocab is not None and k > vocab:
        raise args.shape_error(
            "teacher_top_k_log_probs", f"k <= the vocabulary {vocab}", log_probs
        )
    if not keras.backend.standardize_dtype(ids.dtype).startswith("int"):
        raise _checks.invalid(
            "teacher_top_k_ids", "integer token ids", ids.dtype
        )
    labels, mask = args.tensor(labels), args.tensor(mask)
    for name, value in (("labels", labels), ("mask", mask)):
        if value is not None:
            args.same_leading(name, value, hidden)
    cfg = {
        "labels": labels is not None,
        "student_layout": layout,
        "student_cap": args.cap(
            "student_logit_soft_cap", options["student_logit_soft_cap"]
        ),
        "temperature_is_one": isinstance(temperature, float)
        and temperature == 1.0,
        "chunk_size": chunk_size or loop.default_chunk_size(vocab),
    }
    inputs = {
        "student_hidden": hidden,
        "student_kernel": kernel,
        "log_probs": log_probs,
        "ids": ids,
        "tail": tail,
        "labels": labels,
        "mask": mask,
        "temperature": temperature,
        "alpha": options["alpha"],
        "teacher_temperature": _teacher_temperature(
            options["teacher_temperature"], temperature
        ),
    }
    return _fused_top_k_loss(inputs, cfg)


def fused_linear_top_k_divergence(
    student_hidden,
    student_kernel,
    teacher_top_k_log_probs,
    teacher_top_k_ids,
    teacher_tail_log_prob,
    mask=None,
    temperature=1.0,
    chunk_size=None,
    student_kernel_layout="hv",
    student_logit_soft_cap=None,
    teacher_temperature=None,
):
    """KL divergence from a cached top-k teacher, from the student's hidden
    states, without building the student's logits.

    The teacher is `k + 1` buckets per token: its `k` most likely ids and
    one tail bucket with the rest of its mass. The student is grouped into
    the same buckets: its probabilities of those `k` ids, and its tail mass
    (a log-sum-exp over its other logits, computed chunk by chunk). The
    loss is the exact KL between the two bucketed distributions; at
    `k = vocab` (an empty tail) it is the full KL, and for smaller `k` a
    lower bound of it (grouping outcomes never increases a KL).

    Formula:

    ```
    s = student_hidden @ student_kernel            # capped if asked
    Q = softmax(s / T)                             # per token
    P_i = exp(teacher_top_k_log_probs_i)           # i = 1..k, then
    P_0 = exp(teacher_tail_log_prob)               # normalized to sum 1
    q_i = Q[teacher_top_k_ids_i],  q_0 = 1 - sum_i q_i   # as a logsumexp
    loss = T**2 * sum_n mask_n sum_{b=0..k} P_b log(P_b / q_b) / sum mask
    ```

    The gradient with respect to token n's logit `s_j`, formed in the
    forward pass, is `T * mask_n / sum(mask)` times `Q_j - P_i` for
    `j = id_i`, and `Q_j (1 - P_0 / q_0)` for `j` in the tail. Values are
    computed in log space and without cancellation near the teacher
    (`q_b phi(u_b)` with `u_b = log(P_b / q_b)`, as
    `fused_linear_divergence`), and exactly when the tail is empty or the
    student's tail mass underflows.

    Args:
        student_hidden: the student's last hidden states `[..., H]`.
        student_kernel: its output kernel, `[H, V]` (`"hv"`) or `[V, H]`
            (`"vh"`, a tied embedding matrix).
        teacher_top_k_log_probs: the teacher's top-k log-probabilities
            `log softmax(t / T)` `[..., k]` (any float dtype, e.g. the
            cache's float16). No gradient flows to them.
        teacher_top_k_ids: their token ids `[..., k]`, distinct per token,
            in `[0, V)` (an id out of range makes the loss NaN).
        teacher_tail_log_prob: `log(1 - sum of the top-k probabilities)`
            `[...]`, `-inf` where the top k hold all the mass.
        mask: real tokens, bool or float weights, shape `[...]`.
        temperature: `T > 0`, the temperature the teacher's values were
            computed at; a number or a scalar tensor/variable.
        chunk_size: tokens per chunk, or `None` (as
            `fused_linear_divergence`).
        student_kernel_layout: `"hv"` or `"vh"`.
        student_logit_soft_cap: Gemma's `final_logit_soft_cap`, or `None`.
        teacher_temperature: the temperature the cache was made at (the
            cache's `teacher_temperature` array, or a number), or `None`
            (not checked). A number that differs from `temperature` is a
            `ValueError`; a tensor that does makes the loss NaN and its
            gradients 0 (a top-k cache fixes the temperature).

    Returns:
        A scalar, float64 for float64 student inputs, float32 otherwise.

    Example:

    >>> cache = keras_kd.cache_causal_lm_top_k(teacher, x, k=64)
    >>> fused_linear_top_k_divergence(
    ...     hidden, kernel, cache["teacher_top_k_log_probs"],
    ...     cache["teacher_top_k_ids"], cache["teacher_tail_log_prob"],
    ...     mask=x["padding_mask"])
    """
    options = {
        "temperature": temperature,
        "chunk_size": chunk_size,
        "student_kernel_layout": student_kernel_layout,
        "student_logit_soft_cap": student_logit_soft_cap,
        "teacher_temperature": teacher_temperature,
        "alpha": 0.0,
    }
    teacher = (
        teacher_top_k_log_probs,
        teacher_top_k_ids,
        teacher_tail_log_prob,
    )
    out = _call(student_hidden, student_kernel, teacher, None, mask, options)
    return out[0]


def fused_linear_top_k_distillation_loss(
    student_hidden,
    student_kernel,
    teacher_top_k_log_probs,
    teacher_top_k_ids,
    teacher_tail_log_prob,
    labels,
    mask=None,
    alpha=0.1,
    temperature=1.0,
    chunk_size=None,
    student_kernel_layout="hv",
    student_logit_soft_cap=None,
    teacher_temperature=None,
    return_components=False,
):
    """`alpha * cross_entropy + (1 - alpha) * top-k divergence` in one pass
    over the student's hidden states (one matmul per chunk).

    Formula:

    ```
    loss = alpha * fused_linear_cross_entropy(...)         # T = 1
           + (1 - alpha) * fused_linear_top_k_divergence(...)  # T**2 KL
    ```

    Args:
        student_hidden, student_kernel, teacher_top_k_log_probs,
            teacher_top_k_ids, teacher_tail_log_prob, mask, temperature,
            chunk_size, student_kernel_layout, student_logit_soft_cap,
            teacher_temperature: as in `fused_linear_top_k_divergence`.
        labels: integer next-token ids `[...]`.
        alpha: weight of the cross-entropy in `[0, 1]` (a number or a
            scalar tensor/variable).
        return_components: also return both terms (for logging: they carry
            no gradient).

    Returns:
        The scalar loss, or `(loss, cross_entropy, divergence)`.
    """
    options = {
        "temperature": temperature,
        "chunk_size": chunk_size,
        "student_kernel_layout": student_kernel_layout,
        "student_logit_soft_cap": student_logit_soft_cap,
        "teacher_temperature": teacher_temperature,
        "alpha": args.weight("alpha", alpha),
    }
    teacher = (
        teacher_top_k_log_probs,
        teacher_top_k_ids,
        teacher_tail_log_prob,
    )
    out = _call(student_hidden, student_kernel, teacher, labels, mask, options)
    if not return_components:
        return out[0]
    return out[0], ops.stop_gradient(out[1]), ops.stop_gradient(out[2])
