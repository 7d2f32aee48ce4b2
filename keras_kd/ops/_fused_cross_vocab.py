"""Cross-vocabulary distillation from hidden states: ULD and the hybrid
distance (`_sorted_distance.py`) computed chunk by chunk over aligned
groups, and the per-token log-probabilities a group's scale needs, without
a `[tokens, vocab]` tensor.

A group is a stretch of text that is one or more tokens on each side (see
`keras_kd.align_tokens`). Its distribution on one side is the model's
distribution at the group's first token times the model's probability of
the group's later tokens: `exp(log_scale) * softmax(z / T)`, the scale
coming from `fused_linear_token_log_probs`. Both functions here follow the
conventions of `fused_linear_divergence` (kernel layouts, soft caps,
masks, chunk sizes, dtypes).
"""

from keras import ops

from keras_kd import _checks
from keras_kd.ops import _fused_linear_args as args
from keras_kd.ops import _fused_linear_math as fm
from keras_kd.ops import _sorted_distance as sd
from keras_kd.ops._chunk_engine import (
    EINSUM,
    default_chunk_size,
    flat_rows,
    run_chunks,
    token_weights_and_labels,
    with_student_gradients,
)
from keras_kd.ops._core import (
    _constant,
    _finite_log_probabilities,
    compute_dtype,
    dtype_of,
    matmul_dtype,
)


def _logits(hidden, kernel, layout, cap, dtype):
    raw = ops.cast(ops.einsum(EINSUM[layout][0], hidden, kernel), dtype)
    return raw, fm.soft_cap(raw, cap)


def _zero_inactive(active, *rows):
    out = []
    for x in rows:
        keep = active if len(x.shape) == 1 else ops.expand_dims(active, -1)
        out.append(ops.where(keep, x, ops.zeros_like(x)))
    return out


def _vocab_cut(name, kernel, layout, hidden, size):
    """The kernel's first `size` vocabulary entries (all for `None`)."""
    vocab = args.kernel_vocab(name, kernel, layout, hidden)
    if size is None:
        return kernel, vocab
    size = _checks.integer(f"{name.split('_')[0]}_vocabulary_size", size, low=1)
    if vocab is not None and size > vocab:
        raise args.shape_error(
            name, f"at least {size} vocabulary entries", kernel
        )
    if size == vocab:
        return kernel, vocab
    return (kernel[:, :size] if layout == "hv" else kernel[:size]), size


def fused_linear_token_log_probs(
    hidden,
    kernel,
    labels,
    mask=None,
    chunk_size=None,
    kernel_layout="hv",
    logit_soft_cap=None,
):
    """The log-probability of each label under a linear head, from hidden
    states, without building the logits.

    Formula:

    ```
    z = hidden @ kernel                      # capped if asked, per token
    out = z[labels] - logsumexp(z)           # 0 where mask is 0
    ```

    Differentiable with respect to `hidden` and `kernel` for any upstream
    gradient: the backward pass recomputes each chunk's logits (two passes
    over the head in all, peak memory one chunk).

    Args:
        hidden: hidden states `[..., H]`.
        kernel: `[H, V]` (`"hv"`) or `[V, H]` (`"vh"`).
        labels: integer ids `[...]`; one outside `[0, V)` on a real token
            gives NaN there.
        mask: real tokens `[...]` (bool or weights; nonzero is real), or
            `None`. Masked tokens give 0 and no gradient.
        chunk_size: tokens per chunk (`None`: as `fused_linear_divergence`).
        kernel_layout: `"hv"` or `"vh"`.
        logit_soft_cap: Gemma's soft cap, or `None`.

    Returns:
        `[...]` log-probabilities, float32 (float64 for float64 inputs).
    """
    hidden, kernel = args.tensor(hidden), args.tensor(kernel)
    vocab = args.kernel_vocab("kernel", kernel, kernel_layout, hidden)
    labels, mask = args.tensor(labels), args.tensor(mask)
    args.same_leading("labels", labels, hidden)
    if mask is not None:
        args.same_leading("mask", mask, hidden)
    cap = args.cap("logit_soft_cap", logit_soft_cap)
    size = args.checked_chunk_size(chunk_size) or default_chunk_size(vocab)
    dtype = compute_dtype([hidden, kernel])
    lead = ops.shape(hidden)[:-1]
    rows_dtype = matmul_dtype(hidden, dtype)
    flat = flat_rows(hidden, rows_dtype)
    w = ops.cast(kernel, rows_dtype)
    flat_labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    if mask is None:
        active = ops.ones(ops.shape(flat_labels), dtype)
    else:
        active = ops.cast(ops.cast(ops.reshape(mask, (-1,)), "bool"), dtype)
    eq = EINSUM[kernel_layout]
    nan = _constant(float("nan"), dtype)

    def forward_chunk(w, h, y, on):
        real = on != 0
        h, y = _zero_inactive(real, h, y)
        _, z = _logits(h, w, kernel_layout, cap, dtype)
        log_p = _finite_log_probabilities(z, True, 1.0, -1)
        valid = ops.logical_and(y >= 0, y < z.shape[-1])
        safe = ops.expand_dims(ops.where(valid, y, 0), -1)
        picked = ops.squeeze(ops.take_along_axis(log_p, safe, axis=-1), -1)
        picked = ops.where(valid, picked, nan)
        return (ops.where(real, picked, ops.zeros_like(picked)),), ()

    def backward_chunk(w, h, y, on, up):
        real = on != 0
        h, y, up = _zero_inactive(real, h, y, up)
        raw, z = _logits(h, w, kernel_layout, cap, dtype)
        p = ops.exp(_finite_log_probabilities(z, True, 1.0, -1))
        hit = ops.expand_dims(y, -1) == ops.arange(z.shape[-1], dtype="int32")
        dz = (ops.cast(hit, dtype) - p) * ops.expand_dims(up, -1)
        if cap is not None:
            dz = dz * fm.soft_cap_slope(raw, cap)
        dz = ops.cast(dz, h.dtype)
        return (ops.einsum(eq[1], dz, w),), (ops.einsum(eq[2], h, dz),)

    # Every tensor goes through `custom_gradient` (JAX refuses closed-over
    # tracers; torch saves them for the backward pass).
    @ops.custom_gradient
    def compute(flat, w_in, flat_labels, active):
        (out,), _ = run_chunks(
            lambda *rows: forward_chunk(w_in, *rows),
            size,
            (flat, flat_labels, active),
            [((), dtype)],
        )

        def grad(*found, upstream=None):
            if upstream is None:
                (upstream,) = found
            up = ops.cast(ops.reshape(upstream, (-1,)), dtype)
            grad_dtype = dtype_of(kernel) if dtype == "float32" else dtype
            (d_hidden,), (d_kernel,) = run_chunks(
                lambda *rows: backward_chunk(w_in, *rows),
                size,
                (flat, flat_labels, active, up),
                [((flat.shape[-1],), rows_dtype)],
                [ops.zeros(ops.shape(w_in), grad_dtype)],
            )
            return (
                ops.cast(d_hidden, flat.dtype),
                ops.cast(d_kernel, w_in.dtype),
                None,
                None,
            )

        return out, grad

    return ops.reshape(compute(flat, w, flat_labels, active), lead)


def fused_linear_logit_distance(
    student_hidden,
    student_kernel,
    teacher_hidden,
    teacher_kernel,
    mask=None,
    distance="universal",
    beta=0.5,
    temperature=1.0,
    student_log_scale=None,
    teacher_log_scale=None,
    matched_ids=None,
    chunk_size=None,
    student_kernel_layout="hv",
    teacher_kernel_layout="hv",
    student_logit_soft_cap=None,
    teacher_logit_soft_cap=None,
    student_vocabulary_size=None,
    teacher_vocabulary_size=None,
):
    """ULD or the hybrid distance between a student and a teacher over
    different vocabularies, from hidden states, without building the
    logits.

    Formula, per row `n` (a token, or an aligned group of tokens):

    ```
    a_n = exp(student_log_scale_n) * softmax(student_hidden_n @ W_s / T)
    b_n = exp(teacher_log_scale_n) * softmax(teacher_hidden_n @ W_t / T)
    loss = T**2 * sum_n mask_n D(b_n, a_n) / sum_n mask_n
    ```

    with `D` the sorted L1 of `universal_logit_distance`
    (`distance="universal"`) or the distance of `hybrid_logit_distance`
    (`"hybrid"`). Computed in chunks of rows (one matmul per model per
    chunk, then a sort), the gradients with respect to the student's hidden
    states, kernel and log-scale formed in the same pass:

    ```
    h = a * dD/da,  dL/dz_s = T (h - softmax(z_s / T) sum(h)),
    dL/d student_log_scale = T**2 sum(h)      # times mask_n / sum(mask)
    ```

    Args:
        student_hidden: `[..., H_s]`, the student's hidden state before
            each row's first token.
        student_kernel: `[H_s, V_s]` or `[V_s, H_s]` (layout).
        teacher_hidden: `[..., H_t]`, the same leading shape. No gradient.
        teacher_kernel: `[H_t, V_t]` or `[V_t, H_t]`. No gradient.
        mask: real rows `[...]` (bool or weights), or `None`.
        distance: `"universal"` or `"hybrid"`.
        beta: the hybrid's JSD weight in `[0, 1]`.
        temperature: `T > 0`.
        student_log_scale: `[...]` log of each row's scale (the student's
            log-probability of the row's later tokens), or `None` (0).
        teacher_log_scale: the same for the teacher (no gradient).
        matched_ids: the hybrid's `(student_ids, teacher_ids)` pairs
            (`keras_kd.match_vocabularies`), or `None` for one shared
            vocabulary.
        chunk_size: rows per chunk (`None`: chosen from the larger
            vocabulary, half of `fused_linear_divergence`'s default, the
            sort needing index arrays).
        student_kernel_layout, teacher_kernel_layout: `"hv"` or `"vh"`.
        student_logit_soft_cap, teacher_logit_soft_cap: soft caps or
            `None`.
        student_vocabulary_size, teacher_vocabulary_size: the ids the
            tokenizers use; a kernel's further (padding) entries are left
            out. `None`: all.

    Returns:
        A scalar, float32 (float64 for float64 inputs).
    """
    _checks.choice("distance", distance, sd.DISTANCES)
    beta = _checks.fraction("beta", beta)
    temperature = args.checked_temperature(temperature)
    hidden, t_hidden = args.tensor(student_hidden), args.tensor(teacher_hidden)
    kernel, t_kernel = args.tensor(student_kernel), args.tensor(teacher_kernel)
    kernel, vocab = _vocab_cut(
        "student_kernel",
        kernel,
        student_kernel_layout,
        hidden,
        student_vocabulary_size,
    )
    t_kernel, t_vocab = _vocab_cut(
        "teacher_kernel",
        t_kernel,
        teacher_kernel_layout,
        t_hidden,
        teacher_vocabulary_size,
    )
    args.same_leading("teacher_hidden", t_hidden, hidden, extra_dims=1)
    inputs = {}
    for name, value in (
        ("student_log_scale", student_log_scale),
        ("teacher_log_scale", teacher_log_scale),
        ("mask", mask),
    ):
        inputs[name] = args.tensor(value)
        if value is not None:
            args.same_leading(name, inputs[name], hidden)
    caps = (
        args.cap("student_logit_soft_cap", student_logit_soft_cap),
        args.cap("teacher_logit_soft_cap", teacher_logit_soft_cap),
    )
    match = None
    if distance == "hybrid":
        match = sd.vocabulary_match(matched_ids, vocab, t_vocab)
    size = args.checked_chunk_size(chunk_size)
    size = size or default_chunk_size(2 * max(vocab, t_vocab))
    dtype = compute_dtype([hidden, kernel])
    layouts = (student_kernel_layout, teacher_kernel_layout)
    flat = flat_rows(hidden)
    rows = ops.shape(flat)[0]
    log_scale = inputs["student_log_scale"]
    if log_scale is None:
        log_scale = ops.zeros((rows,), dtype)

    def compute(tensors, gradients):
        s_hidden, s_kernel, s_scale, t_hidden, t_kernel, lct, mask = tensors
        s_dtype = matmul_dtype(s_hidden, dtype)
        t_dtype = matmul_dtype(t_hidden, dtype)
        h_s = flat_rows(s_hidden, s_dtype)
        w_s = ops.cast(s_kernel, s_dtype)
        h_t = ops.stop_gradient(flat_rows(t_hidden, t_dtype))
        w_t = ops.stop_gradient(ops.cast(t_kernel, t_dtype))
        lcs = ops.cast(ops.reshape(s_scale, (-1,)), dtype)
        lct = ops.stop_gradient(ops.cast(ops.reshape(lct, (-1,)), dtype))
        weights, _ = token_weights_and_labels(
            mask, None, ops.shape(lcs)[0], dtype
        )
        t = temperature
        t = ops.cast(t, dtype) if ops.is_tensor(t) else t
        constants = None if match is None else match.tensors(dtype)
        grad_dtype = dtype_of(s_kernel) if dtype == "float32" else dtype

        def chunk(hs, ht, ls, lt, wt):
            real = wt != 0
            hs, ht, ls, lt = _zero_inactive(real, hs, ht, ls, lt)
            raw, zs = _logits(hs, w_s, layouts[0], caps[0], dtype)
            _, zt = _logits(ht, w_t, layouts[1], caps[1], dtype)
            log_q = _finite_log_probabilities(zs, True, t, -1)
            log_a = sd.floor_logs(log_q + ops.expand_dims(ls, -1))
            log_b = _finite_log_probabilities(zt, True, t, -1)
            log_b = sd.floor_logs(log_b + ops.expand_dims(lt, -1))
            value, h = sd.distance_terms(
                log_a, log_b, distance, beta, constants, gradients
            )
            total = ops.sum(wt * value)
            if not gradients:
                return (), (total,)
            h_sum = ops.sum(h, axis=-1)
            dz = h - ops.exp(log_q) * ops.expand_dims(h_sum, -1)
            dz = dz * ops.expand_dims(wt * t, -1)
            if caps[0] is not None:
                dz = dz * fm.soft_cap_slope(raw, caps[0])
            dz = ops.cast(dz, hs.dtype)
            d_scale = h_sum * wt * (t * t)
            return (
                (ops.einsum(EINSUM[layouts[0]][1], dz, w_s), d_scale),
                (total, ops.einsum(EINSUM[layouts[0]][2], hs, dz)),
            )

        outputs, totals = [], [ops.zeros((), dtype)]
        if gradients:
            outputs = [((h_s.shape[-1],), s_dtype), ((), dtype)]
            totals.append(ops.zeros(ops.shape(w_s), grad_dtype))
        per_row, totals = run_chunks(
            chunk, size, (h_s, h_t, lcs, lct, weights), outputs, totals
        )
        out = ops.reshape(totals[0] * (t * t), (1,))
        if not gradients:
            return (out, None, None, None)
        return (out, per_row[0], totals[1], per_row[1])

    t_scale = inputs["teacher_log_scale"]
    t_scale = ops.zeros((rows,), dtype) if t_scale is None else t_scale
    real = inputs["mask"]
    real = ops.ones((rows,), dtype) if real is None else real
    # Every tensor goes through `custom_gradient`; the gradient reaches the
    # first three.
    tensors = [hidden, kernel, log_scale, t_hidden, t_kernel, t_scale, real]
    return with_student_gradients(compute, tensors, count=3)[0]
