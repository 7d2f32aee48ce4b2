"""The one chunk engine of the fused linear losses: the loop over chunks of
tokens, the loss driver with its custom gradient, and the student's side
of each chunk. The teacher is a strategy object (`_chunk_teachers.py`): a
dense head (`fused_linear_divergence`) or cached top-k buckets
(`fused_linear_top_k_divergence`).

One call computes the loss and, in the same pass, its gradients with
respect to the student's hidden states and kernel; `ops.custom_gradient`
hands them to the backend's autodiff, so no `[tokens, vocab]` tensor ever
exists, in the forward pass or the backward pass.

Per backend:

- JAX and TensorFlow: `ops.fori_loop` (`lax.fori_loop`, `tf.while_loop`)
  over the chunks, so a compiled program keeps one chunk's logits alive at
  a time; per-token results (the hidden-state gradient) are written into
  preallocated buffers with `ops.slice_update` (an in-place
  dynamic-update-slice under XLA). The token count may be unknown while
  tracing (TensorFlow).
- torch: a Python loop (torch runs eagerly; `fori_loop` is a Python loop
  there too) whose per-token pieces are concatenated once at the end,
  instead of copying the whole buffer per chunk.

The gradient function takes `(*args, upstream=None)`: TensorFlow and JAX
pass the upstream gradient positionally, torch passes the saved inputs and
`upstream=`. It returns `None` for every input but the student's hidden
states and kernel (all three backends accept `None` as "no gradient").
"""

import functools
import math

import keras
from keras import ops

from keras_kd.ops import _fused_linear_math as fm
from keras_kd.ops._core import compute_dtype, dtype_of, matmul_dtype
from keras_kd.ops._torch_compile import maybe_compiled

# The default chunk keeps one [chunk, vocab] float32 block at ~8 MiB on a
# CPU: XLA keeps a few such blocks alive at once (47 MiB of scratch in all
# at vocab 32,000 and hidden 256, the kernel-gradient accumulator
# included). On a GPU, 128 MiB (256 tokens at a 128,256 vocabulary):
# measured on an H200 (BENCHMARKS.md, "GPU"), JAX then takes 49 ms and
# 0.89 GB where 128 tokens take 72 ms and 0.72 GB, and 512 more memory
# for little time; smaller chunks leave the matrix units idle.
_CHUNK_FLOATS = 2**21
_GPU_CHUNK_FLOATS = 2**25

EINSUM = {
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


def flat_rows(x, dtype=None):
    """`x` `[..., d]` as `[tokens, d]`, cast to `dtype` if given."""
    flat = ops.reshape(x, (-1, x.shape[-1]))
    return flat if dtype is None else ops.cast(flat, dtype)


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


def run_chunks(chunk, size, inputs, outputs=(), totals=(), fixed_size=False):
    """Runs `chunk` over chunks of `size` rows of `inputs` (tensors with
    the same first axis, or `None`).

    `chunk(*rows) -> (pieces, parts)`: per-row results, one per entry of
    `outputs` (`(trailing shape, dtype)`), stacked back into `[rows, ...]`
    tensors; and results summed over the chunks into `totals` (initial
    values, each sum kept in its dtype). Returns `(per_row, sums)`.
    """
    first = next(x for x in inputs if x is not None)
    n = ops.shape(first)[0]
    steps = (n + size - 1) // size
    if isinstance(n, int):
        # At least one (then fully padded) chunk: a loop body is traced
        # even when it runs zero times, and it slices one chunk.
        size = size if fixed_size else max(1, min(size, n))
        steps = max(1, (n + size - 1) // size)
    pad = steps * size - n
    padded = [None if x is None else _pad_rows(x, pad) for x in inputs]
    totals = tuple(totals)

    def rows(start):
        return [None if x is None else _rows(x, start, size) for x in padded]

    def add(sums, parts):
        return tuple(s + ops.cast(p, s.dtype) for s, p in zip(sums, parts))

    if keras.backend.backend() == "torch":
        pieces = [[] for _ in outputs]
        for step in range(steps):
            found, parts = chunk(*rows(step * size))
            for kept, piece in zip(pieces, found):
                kept.append(piece)
            totals = add(totals, parts)
        per_row = [ops.concatenate(p, axis=0)[:n] for p in pieces]
        return per_row, totals

    def body(step, carry):
        buffers, sums = carry
        start = step * size
        found, parts = chunk(*rows(start))
        buffers = tuple(
            ops.slice_update(buffer, [start] + [0] * len(tail), piece)
            for buffer, piece, (tail, _) in zip(buffers, found, outputs)
        )
        return buffers, add(sums, parts)

    buffers = tuple(
        ops.zeros((steps * size,) + tuple(tail), dtype)
        for tail, dtype in outputs
    )
    buffers, totals = ops.fori_loop(0, steps, body, (buffers, totals))
    return [buffer[:n] for buffer in buffers], totals


def _chunk(static, kernel, constants, numbers, hidden, weights, labels, *rows):
    """The work of one chunk: the student's logits, the teacher's terms,
    the cross-entropy, and both gradients. A pure function of tensors and
    the hashable `static` options, so that torch can compile it once per
    configuration (`_torch_compile.maybe_compiled`)."""
    cfg, teacher, teacher_static, dtype, gradients = static
    cfg = dict(cfg)
    temperature, alpha = numbers
    scale = 2.0 / temperature
    equations = EINSUM[cfg["student_layout"]]
    # Masked rows are zeroed before the matmuls, not multiplied by 0 after
    # them: padding may hold NaN hidden states or out-of-range labels and
    # ids, and no [chunk, vocab] `where` is needed.
    active = weights != 0
    hidden = ops.where(
        ops.expand_dims(active, -1), hidden, ops.zeros_like(hidden)
    )
    # In the student's matmul dtype, then the softmax math's.
    raw = ops.cast(ops.einsum(equations[0], hidden, kernel), dtype)
    zs = fm.soft_cap(raw, cfg["student_cap"])
    student = fm.student_parts(zs, scale)
    zero = ops.zeros_like(weights)
    nan = ops.full_like(weights, math.nan)
    ce, div, grad = zero, zero, None
    if teacher is not None:
        div, g_div, bad = teacher.terms(
            teacher_static, constants, student, scale, active, rows
        )
        # d (T**2 D(softmax(s / T))) / d s = T * d D / d a.
        factor = weights * (temperature * (1.0 - alpha))
        if bad is not None:
            # NaN, never a finite wrong loss; its gradient is made NaN by
            # its row factor (a [chunk, vocab] `where` is slow on torch).
            div = ops.where(bad, nan, div)
            factor = ops.where(bad, nan, factor)
        grad = g_div * ops.expand_dims(factor, -1)
    if cfg["labels"]:
        labels = ops.where(active, labels, ops.zeros_like(labels))
        at_one = student[1:] if cfg["temperature_is_one"] else None
        ce, g_ce, valid = fm.cross_entropy_terms(student[0], labels, at_one)
        factor = ops.where(valid, weights * alpha, nan)
        g_ce = g_ce * ops.expand_dims(factor, -1)
        grad = g_ce if grad is None else grad + g_ce
    sums = ops.stack([ops.sum(weights * ce), ops.sum(weights * div)])
    if not gradients:
        return (), (sums,)
    if cfg["student_cap"] is not None:
        grad = grad * fm.soft_cap_slope(raw, cfg["student_cap"])
    # Half-precision products take the logit gradient in their dtype.
    grad = ops.cast(grad, hidden.dtype)
    d_hidden = ops.einsum(equations[1], grad, kernel)
    d_kernel = ops.einsum(equations[2], hidden, grad)
    return (d_hidden,), (sums, d_kernel)


def fused_loss(student, teacher, cfg):
    """`[total, cross_entropy, divergence]` with the custom gradient.

    Args:
        student: a dict of validated inputs: `student_hidden`,
            `student_kernel`, `labels` and `mask` (tensors or `None`),
            `temperature` and `alpha` (floats or scalar tensors).
        teacher: a strategy of `_chunk_teachers.py`, or `None` (the
            cross-entropy alone).
        cfg: the static options: `labels` (whether given),
            `student_layout`, `student_cap`, `temperature_is_one`,
            `chunk_size`.

    Gradients flow to the student's hidden states and kernel only, through
    `total`.
    """
    inputs = dict(student, **(teacher.inputs if teacher else {}))
    # Only tensors go through custom_gradient (torch saves them for the
    # backward pass); Python floats stay closed over. The student's hidden
    # states and kernel come first (`with_student_gradients`).
    names = [k for k, v in inputs.items() if ops.is_tensor(v)]
    precision = ["student_hidden", "student_kernel"]
    precision += list(teacher.precision_inputs) if teacher else []
    dtype = compute_dtype([inputs[k] for k in precision])

    def compute(tensors, gradients):
        given = dict(inputs, **dict(zip(names, tensors)))
        hidden, kernel = given["student_hidden"], given["student_kernel"]
        # The kernel gradient is accumulated in the kernel's own dtype: a
        # float32 accumulator for a bfloat16 [H, V] kernel would double
        # the memory the gradient needs.
        grad_dtype = dtype_of(kernel)
        grad_dtype = grad_dtype if dtype == "float32" else dtype
        student_dtype = matmul_dtype(hidden, dtype)
        flat = flat_rows(hidden, student_dtype)
        kernel = ops.cast(kernel, student_dtype)
        t, a = given["temperature"], given["alpha"]
        t = ops.cast(t, dtype) if ops.is_tensor(t) else t
        a = ops.cast(a, dtype) if ops.is_tensor(a) else a
        weights, labels = token_weights_and_labels(
            given["mask"], given["labels"], ops.shape(flat)[0], dtype
        )
        rows, constants = (
            teacher.prepare(given, dtype) if teacher else ((), None)
        )
        static = (
            tuple(sorted(cfg.items())),
            type(teacher) if teacher else None,
            teacher.static if teacher else None,
            dtype,
            gradients,
        )
        body = maybe_compiled(_chunk)
        compiled = body is not _chunk
        numbers = tuple(
            ops.convert_to_tensor(n, dtype) if compiled else n for n in (t, a)
        )

        def chunk(*rows):
            if not compiled:
                return body(static, kernel, constants, numbers, *rows)
            # The gradients are closed-form: nothing in a chunk is tracked
            # by autograd, and one `requires_grad` flag for every chunk
            # keeps torch.compile from compiling it twice.
            tensors = keras.tree.map_structure(
                lambda t: t if t is None else ops.stop_gradient(t),
                (kernel, constants, numbers, rows),
            )
            return body(static, *tensors[:3], *tensors[3])

        sums = ops.zeros((2,), dtype=dtype)
        outputs, totals = [], [sums]
        if gradients:
            outputs.append(((flat.shape[-1],), student_dtype))
            totals.append(ops.zeros(ops.shape(kernel), dtype=grad_dtype))
        per_row, totals = run_chunks(
            chunk,
            cfg["chunk_size"],
            (flat, weights, labels, *rows),
            outputs,
            totals,
            # A compiled chunk keeps one shape for every input length.
            fixed_size=compiled,
        )
        sums = totals[0]
        ce, div = sums[0], sums[1] * (t * t)
        # The public functions pass alpha = 1 (no teacher) or 0 (no labels).
        out = ops.stack([a * ce + (1.0 - a) * div, ce, div])
        grads = (per_row[0], totals[1]) if gradients else None
        if teacher is not None:
            out, grads = teacher.finish(given, dtype, t, out, grads)
        return (out,) + (grads if gradients else (None, None))

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


def with_student_gradients(compute, tensors, count=2):
    """`compute(tensors, gradients) -> (out, *grads)` as a function of
    `tensors` whose gradient goes to the first `count` (the student's
    hidden states and kernel, and any other student input with a
    closed-form gradient), each scaled by the upstream gradient of
    `out[0]`, and to nothing else. `grads` come flat or in the inputs'
    shapes."""
    if keras.backend.backend() == "torch" and not _torch_needs_gradient(
        tensors[:count]
    ):
        # Evaluation: skip the two gradient matmuls of every chunk.
        return compute(tensors, gradients=False)[0]

    @ops.custom_gradient
    def forward(*tensors):
        out, *found = compute(tensors, gradients=True)

        def grad(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            # Scaled in the gradients' own dtype: no float32 copy of a
            # half-precision [H, V] kernel gradient.
            up = upstream[0]
            grads = tuple(
                ops.cast(
                    ops.reshape(g * ops.cast(up, g.dtype), ops.shape(x)),
                    x.dtype,
                )
                for g, x in zip(found, tensors)
            )
            return grads + (None,) * (len(tensors) - count)

        return out, grad

    return forward(*tensors)


def _torch_needs_gradient(tensors):
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
