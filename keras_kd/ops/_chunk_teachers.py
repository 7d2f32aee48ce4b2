"""The teachers of the chunk engine (`_chunk_engine.py`): what the teacher
adds to one chunk of the student's logits.

A strategy holds the teacher's inputs and static options, and answers:

- `inputs`: `{name: tensor or None}`, passed through the engine's custom
  gradient (they get no gradient);
- `precision_inputs`: the names among them whose float64 makes the
  softmax math float64;
- `prepare(given, dtype) -> (rows, constants)`: per-token tensors
  `[tokens, ...]` the engine slices into chunks, and whatever else the
  chunks read (the teacher's kernel), from `given` (the inputs as the
  custom gradient sees them) and the softmax math's `dtype`;
- `static`: a hashable tuple of the options `terms` reads;
- `terms(static, constants, student, scale, active, rows) -> (value, grad,
  bad)`, a static method (the chunk body may be compiled, and is then
  reused for equal `static`): per token the divergence without `T**2`,
  its gradient with respect to the student's scaled logits `a = s / T`,
  and the rows whose value must be NaN (or `None`), from
  `student = (half, total, q)` of `_fused_linear_math.student_parts` and
  `active` (unmasked rows; the others may hold garbage);
- `finish(given, dtype, temperature, out, grads) -> (out, grads)`: a last
  look at `[total, cross_entropy, divergence]` and the student's
  gradients (`None` when none are computed).
"""

import math

from keras import ops

from keras_kd.ops import _fused_linear_math as fm
from keras_kd.ops._chunk_engine import EINSUM, flat_rows
from keras_kd.ops._core import matmul_dtype
from keras_kd.ops._top_k_buckets import bucket_kl_terms

# A cached temperature is float32; one given as a Python float may differ
# from it by rounding.
TEMPERATURE_RTOL = 1e-6


def _active_rows(active, x):
    """`x` `[chunk, ...]` with its inactive rows zeroed."""
    shape = tuple(active.shape) + (1,) * (len(x.shape) - 1)
    return ops.where(ops.reshape(active, shape), x, ops.zeros_like(x))


class DenseTeacher:
    """A teacher given by its hidden states and output kernel: its logits
    are computed chunk by chunk, in its own matmul dtype."""

    precision_inputs = ("teacher_hidden", "teacher_kernel")

    def __init__(self, hidden, kernel, layout, cap, divergence, beta, precise):
        self.inputs = {"teacher_hidden": hidden, "teacher_kernel": kernel}
        # Hashable, and all `terms` reads: a compiled chunk is reused for
        # every call with equal options.
        self.static = (
            EINSUM[layout][0],
            cap,
            divergence,
            beta,
            fm.divergence_terms if precise else fm.fast_divergence_terms,
        )

    def prepare(self, given, dtype):
        hidden = given["teacher_hidden"]
        # A half-precision teacher runs its products as its own head does.
        teacher_dtype = matmul_dtype(hidden, dtype)
        kernel = ops.cast(given["teacher_kernel"], teacher_dtype)
        return (flat_rows(hidden, teacher_dtype),), kernel

    @staticmethod
    def terms(static, kernel, student, scale, active, rows):
        equation, cap, divergence, beta, divergence_terms = static
        hidden = _active_rows(active, rows[0])
        zt = ops.einsum(equation, hidden, kernel)
        zt = fm.soft_cap(ops.cast(zt, student[2].dtype), cap)
        value, grad = divergence_terms(student, zt, scale, divergence, beta)
        return value, grad, None

    def finish(self, given, dtype, temperature, out, grads):
        return out, grads


class TopKTeacher:
    """A teacher given per token by its top-k log-probabilities, their ids
    and the log of its remaining mass (`_top_k_buckets.py`), maybe with
    the temperature it was cached at (a tensor: checked in the graph)."""

    precision_inputs = ()
    static = ()

    def __init__(self, log_probs, ids, tail, cached_temperature):
        self.inputs = {
            "teacher_log_probs": log_probs,
            "teacher_ids": ids,
            "teacher_tail": tail,
            "teacher_temperature": cached_temperature,
        }

    def prepare(self, given, dtype):
        log_probs = flat_rows(given["teacher_log_probs"], dtype)
        ids = flat_rows(given["teacher_ids"], "int32")
        tail = ops.cast(ops.reshape(given["teacher_tail"], (-1,)), dtype)
        return (log_probs, ids, tail), None

    @staticmethod
    def terms(static, constants, student, scale, active, rows):
        log_probs, ids, tail = rows
        half, total, q = student
        vocab = q.shape[-1]
        # Inactive rows are neutralized before any math (their cached
        # values may be NaN, their ids out of range).
        in_range = ops.logical_and(ids >= 0, ids < vocab)
        ids = ops.where(in_range, ids, ops.zeros_like(ids))
        ids = _active_rows(active, ids)
        log_probs = _active_rows(active, log_probs)
        tail = _active_rows(active, tail)
        value, grad = bucket_kl_terms(
            half, total, q, scale, log_probs, ids, tail
        )
        # An id out of range gives NaN, never a finite wrong loss.
        bad = ops.logical_and(
            active, ops.logical_not(ops.all(in_range, axis=-1))
        )
        return value, grad, bad

    def finish(self, given, dtype, temperature, out, grads):
        cached = given["teacher_temperature"]
        if cached is None:
            return out, grads
        # A cache made at another temperature: NaN and no update (the
        # teacher's buckets at T cannot be recovered from those at T').
        cached = ops.cast(cached, dtype)
        gap = ops.abs(cached - temperature)
        same = ops.all(gap <= TEMPERATURE_RTOL * ops.abs(temperature))
        out = ops.where(same, out, ops.full_like(out, math.nan))
        if grads is not None:
            grads = tuple(g * ops.cast(same, g.dtype) for g in grads)
        return out, grads
