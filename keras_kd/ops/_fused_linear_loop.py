"""The chunk loop of the fused linear losses and its custom gradient.

One call computes the loss and, in the same pass, its gradients with
respect to the student's hidden states and kernel; `ops.custom_gradient`
hands them to the backend's autodiff, so no `[tokens, vocab]` tensor ever
exists, in the forward pass or the backward pass.

Per backend:

- JAX and TensorFlow: `ops.fori_loop` (`lax.fori_loop`, `tf.while_loop`)
  over the chunks, so a compiled program keeps one chunk's logits alive at
  a time; the hidden-state gradient is written into a preallocated buffer
  with `ops.slice_update` (an in-place dynamic-update-slice under XLA). The
  token count may be unknown while tracing (TensorFlow).
- torch: a Python loop (torch runs eagerly; `fori_loop` is a Python loop
  there too) whose chunk gradients are concatenated once at the end,
  instead of copying the whole buffer per chunk.

The gradient function takes `(*args, upstream=None)`: TensorFlow and JAX
pass the upstream gradient positionally, torch passes the saved inputs and
`upstream=`. It returns `None` for every input but the student's hidden
states and kernel (all three backends accept `None` as "no gradient").
"""

import functools

import keras
from keras import ops

from keras_kd.ops import _fused_linear_math as fm

# The default chunk keeps one [chunk, vocab] float32 block at ~8 MiB on a
# CPU: XLA keeps a few such blocks alive at once (47 MiB of scratch in all
# at vocab 32,000 and hidden 256, the kernel-gradient accumulator
# included). On a GPU, 128 MiB (256 tokens at a 128,256 vocabulary):
# measured on an H200 (BENCHMARKS.md, "GPU"), JAX then takes 49 ms and
# 0.89 GB where 128 tokens take 72 ms and 0.72 GB, and 512 more memory
# for little time; smaller chunks leave the matrix units idle.
_CHUNK_FLOATS = 2**21
_GPU_CHUNK_FLOATS = 2**25

_EINSUM = {
    # layout: (logits, hidden gradient, kernel gradient)
    "hv": ("ch,hv->cv", "cv,hv->ch", "ch,cv->hv"),
    "vh": ("ch,vh->cv", "cv,vh->ch", "ch,cv->vh"),
}


def default_chunk_size(vocab):
    """Tokens per chunk: `2**21 // vocab` on a CPU and `2**25 // vocab` on
    a GPU or TPU, rounded down to a multiple of 8 (at least 8): 64 and
    1048 tokens at a 32,000 vocabulary, 16 and 256 at 128,256."""
    floats = _GPU_CHUNK_FLOATS if _on_accelerator() else _CHUNK_FLOATS
    return max(8, floats // max(vocab, 1) // 8 * 8)


@functools.lru_cache(maxsize=None)
def _on_accelerator():
    """Whether the backend computes on a GPU or TPU by default."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_logical_devices("GPU"))
    return False


def _compute_dtype(tensors):
    dtypes = [keras.backend.standardize_dtype(x.dtype) for x in tensors]
    return "float64" if "float64" in dtypes else "float32"


def _matmul_dtype(hidden, compute_dtype):
    """The dtype one model's products run in: that of its hidden states
    when they are half precision (what its `Dense` head computes in under
    a `bfloat16` or `mixed_bfloat16` policy, the kernel cast to it; what
    GPU matrix units are fast at), else the softmax math's."""
    dtype = keras.backend.standardize_dtype(hidden.dtype)
    return dtype if dtype in ("bfloat16", "float16") else compute_dtype


def _rows(x, start, size):
    if isinstance(start, int):
        return x[start : start + size]
    begin = [start] + [0] * (len(x.shape) - 1)
    return ops.slice(x, begin, [size] + list(x.shape[1:]))


def _pad_rows(x, pad):
    if isinstance(pad, int) and pad == 0:
        return x
    widths = [[0, pad]] + [[0, 0]] * (len(x.shape) - 1)
    return ops.pad(x, widths)


class _Chunk:
    """The work of one chunk: logits, values, and both gradients."""

    def __init__(
        self, cfg, kernels, temperature, alpha, dtypes, gradients=True
    ):
        self.cfg = cfg
        # The softmax math's dtype, and the kernel gradient's.
        self.dtype, self.kernel_grad_dtype = dtypes
        self.gradients = gradients
        self.student_kernel, self.teacher_kernel = kernels
        self.temperature = temperature
        self.alpha = alpha
        self.scale = 2.0 / temperature
        self.equations = _EINSUM[cfg["student_layout"]]

    def __call__(self, hidden, teacher_hidden, weights, labels):
        cfg = self.cfg
        # Masked rows are zeroed before the matmuls, not multiplied by 0
        # after them: padding may hold NaN hidden states or out-of-range
        # labels, and no [chunk, vocab] `where` is needed.
        active = weights != 0
        rows = ops.expand_dims(active, -1)
        hidden = ops.where(rows, hidden, ops.zeros_like(hidden))
        raw = ops.einsum(self.equations[0], hidden, self.student_kernel)
        raw = ops.cast(raw, self.dtype)
        zs = fm.soft_cap(raw, cfg["student_cap"])
        student = fm.student_parts(zs, self.scale)
        zero = ops.zeros_like(weights)
        ce, div, grad = zero, zero, None
        if cfg["divergence"] is not None:
            teacher_hidden = ops.where(
                rows, teacher_hidden, ops.zeros_like(teacher_hidden)
            )
            zt = ops.einsum(
                _EINSUM[cfg["teacher_layout"]][0],
                teacher_hidden,
                self.teacher_kernel,
            )
            zt = ops.cast(zt, self.dtype)
            zt = fm.soft_cap(zt, cfg["teacher_cap"])
            terms = (
                fm.divergence_terms
                if cfg["precise"]
                else fm.fast_divergence_terms
            )
            div, g_div = terms(
                student, zt, self.scale, cfg["divergence"], cfg["beta"]
            )
            # d (T**2 D(softmax(s / T))) / d s = T * d D / d a.
            factor = weights * (self.temperature * (1.0 - self.alpha))
            grad = g_div * ops.expand_dims(factor, -1)
        if cfg["labels"]:
            labels = ops.where(active, labels, ops.zeros_like(labels))
            at_one = student[1:] if cfg["temperature_is_one"] else None
            ce, g_ce, valid = fm.cross_entropy_terms(student[0], labels, at_one)
            nan = ops.full_like(weights, float("nan"))
            factor = ops.where(valid, weights * self.alpha, nan)
            g_ce = g_ce * ops.expand_dims(factor, -1)
            grad = g_ce if grad is None else grad + g_ce
        sums = ops.stack([ops.sum(weights * ce), ops.sum(weights * div)])
        if not self.gradients:
            return None, None, sums
        if cfg["student_cap"] is not None:
            grad = grad * fm.soft_cap_slope(raw, cfg["student_cap"])
        # Half-precision products take the logit gradient in their dtype.
        grad = ops.cast(grad, hidden.dtype)
        d_hidden = ops.einsum(self.equations[1], grad, self.student_kernel)
        d_kernel = ops.einsum(self.equations[2], hidden, grad)
        return d_hidden, d_kernel, sums


def _run_chunks(chunk, size, inputs):
    """Runs `chunk` over the rows of `inputs` = (hidden, teacher hidden,
    weights, labels) and returns (d_hidden, d_kernel, sums)."""
    hidden = inputs[0]
    n = ops.shape(hidden)[0]
    steps = (n + size - 1) // size
    if isinstance(n, int):
        # At least one (then fully masked) chunk: a loop body is traced
        # even when it runs zero times, and it slices one chunk.
        size = max(1, min(size, n))
        steps = max(1, (n + size - 1) // size)
    pad = steps * size - n
    padded = [None if x is None else _pad_rows(x, pad) for x in inputs]
    kernel = chunk.student_kernel
    sums = ops.zeros((2,), dtype=chunk.dtype)
    # In the kernel's own dtype: a float32 accumulator for a bfloat16
    # [H, V] kernel would double the memory the gradient needs.
    grad_dtype = chunk.kernel_grad_dtype
    d_kernel = ops.zeros(ops.shape(kernel), dtype=grad_dtype)

    def rows(start):
        return [None if x is None else _rows(x, start, size) for x in padded]

    if keras.backend.backend() == "torch":
        pieces = []
        for step in range(steps):
            d_h, d_k, s = chunk(*rows(step * size))
            sums = sums + s
            if chunk.gradients:
                pieces.append(d_h)
                d_kernel = d_kernel + ops.cast(d_k, grad_dtype)
        d_hidden = (
            ops.concatenate(pieces, axis=0)
            if pieces
            else ops.zeros_like(padded[0])
        )
        return d_hidden[:n], d_kernel, sums

    def body(step, carry):
        d_hidden, d_kernel, sums = carry
        start = step * size
        d_h, d_k, s = chunk(*rows(start))
        d_hidden = ops.slice_update(d_hidden, [start, 0], d_h)
        return d_hidden, d_kernel + ops.cast(d_k, grad_dtype), sums + s

    carry = (ops.zeros_like(padded[0]), d_kernel, sums)
    d_hidden, d_kernel, sums = ops.fori_loop(0, steps, body, carry)
    return d_hidden[:n], d_kernel, sums


def fused_loss(
    student_hidden,
    student_kernel,
    teacher_hidden,
    teacher_kernel,
    labels,
    mask,
    temperature,
    alpha,
    cfg,
):
    """`[total, cross_entropy, divergence]` with the custom gradient.

    Arguments are validated tensors (teacher, labels and mask may be
    `None`); `temperature` and `alpha` are floats or scalar tensors; `cfg`
    holds the static options. Gradients flow to the student's hidden states
    and kernel only, through `total`.
    """
    inputs = {
        "student_hidden": student_hidden,
        "student_kernel": student_kernel,
        "teacher_hidden": teacher_hidden,
        "teacher_kernel": teacher_kernel,
        "labels": labels,
        "mask": mask,
        "temperature": temperature,
        "alpha": alpha,
    }
    # Only tensors go through custom_gradient (torch saves them for the
    # backward pass); Python floats stay closed over.
    names = [k for k, v in inputs.items() if ops.is_tensor(v)]
    dtype = _compute_dtype(
        [inputs[k] for k in names if k.endswith(("hidden", "kernel"))]
    )

    def compute(tensors, gradients):
        given = dict(inputs, **dict(zip(names, tensors)))
        hidden = given["student_hidden"]
        kernel = given["student_kernel"]
        grad_dtype = keras.backend.standardize_dtype(kernel.dtype)
        grad_dtype = grad_dtype if dtype == "float32" else dtype
        student_dtype = _matmul_dtype(hidden, dtype)
        flat = ops.reshape(hidden, (-1, hidden.shape[-1]))
        flat = ops.cast(flat, student_dtype)
        kernel = ops.cast(kernel, student_dtype)
        t, a = given["temperature"], given["alpha"]
        if ops.is_tensor(t):
            t = ops.cast(t, dtype)
        if ops.is_tensor(a):
            a = ops.cast(a, dtype)
        teacher, teacher_kernel_ = None, None
        if given["teacher_hidden"] is not None:
            th, tk = given["teacher_hidden"], given["teacher_kernel"]
            teacher_dtype = _matmul_dtype(th, dtype)
            teacher = ops.reshape(th, (-1, th.shape[-1]))
            teacher = ops.cast(teacher, teacher_dtype)
            teacher_kernel_ = ops.cast(tk, teacher_dtype)
        weights, labels_ = token_weights_and_labels(
            given["mask"], given["labels"], ops.shape(flat)[0], dtype
        )
        chunk = _Chunk(
            cfg, (kernel, teacher_kernel_), t, a, (dtype, grad_dtype), gradients
        )
        d_hidden, d_kernel, sums = _run_chunks(
            chunk, cfg["chunk_size"], (flat, teacher, weights, labels_)
        )
        ce, div = sums[0], sums[1] * (t * t)
        # The public functions pass alpha = 1 (no teacher) or 0 (no labels).
        out = ops.stack([a * ce + (1.0 - a) * div, ce, div])
        return out, d_hidden, d_kernel

    return with_student_gradients(compute, [inputs[k] for k in names])


def token_weights_and_labels(mask, labels, rows, dtype):
    """Flat per-token weights that sum to 1 over real tokens (all 0 when
    none is real), and flat int32 labels (or `None`)."""
    if mask is not None:
        weights = ops.cast(ops.reshape(mask, (-1,)), dtype)
    else:
        weights = ops.ones((rows,), dtype=dtype)
    count = ops.sum(weights)
    weights = weights / ops.where(count > 0, count, ops.ones_like(count))
    if labels is not None:
        labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    return weights, labels


def with_student_gradients(compute, tensors):
    """`compute(tensors, gradients) -> (out, d_hidden, d_kernel)` as a
    function of `tensors` whose gradient goes to the first two (the
    student's hidden states and kernel), scaled by the upstream gradient
    of `out[0]`, and to nothing else."""
    if keras.backend.backend() == "torch" and not _torch_needs_gradient(
        tensors[:2]
    ):
        # Evaluation: skip the two gradient matmuls of every chunk.
        return compute(tensors, gradients=False)[0]

    @ops.custom_gradient
    def forward(*tensors):
        out, d_hidden, d_kernel = compute(tensors, gradients=True)
        hidden, kernel = tensors[:2]

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # Scaled in the gradients' own dtype: no float32 copy of a
            # half-precision [H, V] kernel gradient.
            up = upstream[0]
            g_hidden = d_hidden * ops.cast(up, d_hidden.dtype)
            g_hidden = ops.reshape(g_hidden, ops.shape(hidden))
            g_kernel = d_kernel * ops.cast(up, d_kernel.dtype)
            return (
                ops.cast(g_hidden, hidden.dtype),
                ops.cast(g_kernel, kernel.dtype),
            ) + (None,) * (len(tensors) - 2)

        return out, grad

    return forward(*tensors)


def _torch_needs_gradient(tensors):
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
