"""Distillation from a cached top-k teacher, from the student's hidden
states: the student's `[tokens, vocab]` logits are never built; and the
cache's side, a linear head's top-k buckets without its logits.

The teacher is given per token by its `k` largest log-probabilities, their
ids, and the log of its remaining mass (one tail bucket), as
`fused_linear_top_k` computes them and `keras_kd.cache_causal_lm_top_k`
stores them. The loss is the exact KL between the teacher's `k + 1`
buckets and the student's distribution over the same buckets (per-chunk
math: `_top_k_buckets.py`). Chunks, layouts, masks, dtypes and gradients
are `fused_linear_divergence`'s: both run the one chunk engine
(`_chunk_engine.py`), the teacher given by a `TopKTeacher`
(`_chunk_teachers.py`).
"""

from keras import ops

from keras_kd import _checks
from keras_kd.ops import _fused_linear_args as args
from keras_kd.ops._chunk_engine import (
    EINSUM,
    default_chunk_size,
    flat_rows,
    fused_loss,
    run_chunks,
)
from keras_kd.ops._chunk_teachers import TEMPERATURE_RTOL, TopKTeacher
from keras_kd.ops._core import (
    _scale,
    compute_dtype,
    dtype_of,
    matmul_dtype,
)
from keras_kd.ops._fused_linear_math import soft_cap
from keras_kd.ops._top_k_buckets import top_k_buckets


def _teacher_temperature(value, temperature):
    """A cached temperature: checked here when both are plain numbers,
    else passed on as a tensor (checked inside the loss)."""
    if value is None:
        return None
    number = _checks.as_python_number(value)
    if number is None or not isinstance(temperature, float):
        return args.tensor(value)
    if not abs(number - temperature) <= TEMPERATURE_RTOL * temperature:
        raise _checks.invalid(
            "temperature",
            f"the temperature the teacher was cached at ({number:g}): a "
            "top-k cache holds the teacher's distribution at one "
            "temperature",
            temperature,
        )
    return None


def _call(student_hidden, student_kernel, teacher, labels, mask, options):
    """Checks every argument, then runs the chunk engine."""
    student, cfg, vocab = args.student_inputs(
        student_hidden, student_kernel, labels, mask, options
    )
    hidden = student["student_hidden"]
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
    if not dtype_of(ids).startswith("int"):
        raise _checks.invalid(
            "teacher_top_k_ids", "integer token ids", ids.dtype
        )
    cached = _teacher_temperature(
        options["teacher_temperature"], student["temperature"]
    )
    return fused_loss(student, TopKTeacher(log_probs, ids, tail, cached), cfg)


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


def fused_linear_top_k(
    hidden,
    kernel,
    k,
    temperature=1.0,
    chunk_size=None,
    kernel_layout="hv",
    logit_soft_cap=None,
    vocabulary_size=None,
):
    """The `k + 1` buckets of a linear head's softmax per token, from its
    hidden states, without building the `[tokens, vocab]` logits: what a
    top-k cache of a teacher holds (`fused_linear_top_k_divergence`).

    Formula:

    ```
    z = hidden @ kernel[:, :vocabulary_size]      # capped if asked
    log_p = log_softmax(z / T)                    # per token
    top_k_log_probs, top_k_ids = top_k(log_p, k)  # largest first
    tail_log_prob = log(sum of exp(log_p) over the other ids)
    ```

    Computed chunk by chunk over the tokens (`ops.fori_loop`, so a
    compiled function holds one `[chunk, vocab]` block at a time), the
    products in the hidden states' dtype when it is half precision (as
    `fused_linear_divergence`), the softmax math in float32 (float64 for
    float64 inputs). The tail is a log-sum-exp over the other logits, exact
    also for a tail far below the float32 resolution of `1 - sum p`. No
    gradient flows to the inputs.

    Args:
        hidden: hidden states `[..., H]`.
        kernel: the output kernel, `[H, V]` (`"hv"`) or `[V, H]` (`"vh"`,
            a tied embedding matrix).
        k: ids kept per token, `1 <= k <= vocabulary_size`.
        temperature: `T > 0`, a number or a scalar tensor/variable.
        chunk_size: tokens per chunk, or `None` (as
            `fused_linear_divergence`).
        kernel_layout: `"hv"` or `"vh"`.
        logit_soft_cap: Gemma's `final_logit_soft_cap` (applied before
            the temperature), or `None`.
        vocabulary_size: use only the first `vocabulary_size` entries of
            the kernel (a padded vocabulary); `None` uses all `V`.

    Returns:
        `(top_k_log_probs, top_k_ids, tail_log_prob)`: `[..., k]` float32
        (float64 for float64 inputs), `[..., k]` int32, and `[...]`, `-inf`
        where the top `k` hold all the mass (`k = vocabulary_size`).

    Example:

    >>> log_probs, ids, tail = fused_linear_top_k(
    ...     np.ones((2, 7, 4)), np.zeros((4, 11)), k=3)
    >>> # log_probs: log(1 / 11) each; tail: log(8 / 11)
    """
    temperature = args.checked_temperature(temperature)
    chunk_size = args.checked_chunk_size(chunk_size)
    hidden, kernel = args.tensor(hidden), args.tensor(kernel)
    full = args.kernel_vocab("kernel", kernel, kernel_layout, hidden)
    vocab = full
    if vocabulary_size is not None:
        vocab = _checks.integer("vocabulary_size", vocabulary_size, low=1)
        if full is not None and vocab > full:
            raise _checks.invalid(
                "vocabulary_size", f"at most the kernel's {full} entries", vocab
            )
    k = _checks.integer("k", k, low=1)
    if vocab is not None and k > vocab:
        raise _checks.invalid("k", f"at most the vocabulary ({vocab})", k)
    cap = args.cap("logit_soft_cap", logit_soft_cap)
    if vocab != full:
        cut = slice(0, vocab)
        kernel = kernel[:, cut] if kernel_layout == "hv" else kernel[cut]
    dtype = compute_dtype([hidden, kernel])
    product_dtype = matmul_dtype(hidden, dtype)
    flat = flat_rows(ops.stop_gradient(hidden), product_dtype)
    kernel = ops.cast(ops.stop_gradient(kernel), product_dtype)
    if not isinstance(temperature, float):
        temperature = ops.cast(temperature, dtype)
    equation = EINSUM[kernel_layout][0]

    def chunk(rows):
        z = ops.cast(ops.einsum(equation, rows, kernel), dtype)
        return top_k_buckets(_scale(soft_cap(z, cap), temperature), k), ()

    outputs = [((k,), dtype), ((k,), "int32"), ((), dtype)]
    size = chunk_size or default_chunk_size(vocab)
    (log_probs, ids, tail), _ = run_chunks(chunk, size, [flat], outputs)
    lead = tuple(ops.shape(hidden)[:-1])
    return (
        ops.reshape(log_probs, lead + (k,)),
        ops.reshape(ids, lead + (k,)),
        ops.reshape(tail, lead),
    )
