"""Row sums of products on the class axis: `rowdot(x, y)` and
`rowdot_difference(x, a, b)`, with torch's eager kernels in mind."""

import math

import keras
from keras import ops

from keras_kd.ops._gradients import torch_eager

_BLOCK = 128
# Rows per chunk of `rowdot_difference` on a CPU: about this many entries
# (4 MiB of float32), so the difference is read back from cache, not from
# memory, and its buffer is a small fraction of one logits array.
_CHUNK = 2**20


def _last(x, axis):
    return keras.backend.backend() == "torch" and axis in (-1, x.ndim - 1)


def rowdot(x, y, axis):
    """`sum(x * y, axis, keepdims=True)`.

    On torch, for the last axis, `einsum` over blocks of 128 classes and a
    sum over the blocks: it reads both operands without writing their
    product to memory (each intermediate is a pass over memory there), and
    two-level accumulation keeps float32 rounding near that of `ops.sum`
    (one `einsum` over 32000 classes is 15x less accurate).
    """
    if not _last(x, axis):
        return ops.sum(x * y, axis=axis, keepdims=True)
    classes = x.shape[-1]
    lead = tuple(x.shape[:-1])
    if classes <= 2 * _BLOCK:
        return ops.expand_dims(ops.einsum("...i,...i->...", x, y), -1)
    blocks = classes // _BLOCK
    head = blocks * _BLOCK

    def split(z):
        return ops.reshape(z[..., :head], lead + (blocks, _BLOCK))

    total = ops.sum(
        ops.einsum("...jk,...jk->...j", split(x), split(y)), axis=-1
    )
    if head < classes:
        total = total + ops.einsum(
            "...i,...i->...", x[..., head:], y[..., head:]
        )
    return ops.expand_dims(total, -1)


def rowdot_difference(x, a, b, axis):
    """`sum(x * (a - b), axis, keepdims=True)`, each difference rounded
    once before it is weighted, as `F.kl_div` does.

    Not `rowdot(x, a) - rowdot(x, b)`: for the KL, `sum P log P` and
    `sum P log Q` are both about the entropy (10 at 32000 classes), and
    their float32 rounding stays in the difference: 2x to 5x the error
    of `F.kl_div` on rows whose KL is 1 or less. On a CPU in eager torch
    the difference is formed a few rows at a time, while in cache: a
    logits-sized `a - b` would be one more write to memory (page faults
    too, when freshly allocated) and one more logits-sized buffer; at
    1024 x 32000 the chunks take 39 ms where the two row sums took 37.
    """
    if not _last(x, axis):
        return ops.sum(x * (a - b), axis=axis, keepdims=True)
    classes = x.shape[-1]
    lead = tuple(x.shape[:-1])
    rows = math.prod(lead)
    step = max(1, _CHUNK // max(classes, 1))
    # On a GPU or under `torch.compile`, one pass over the whole array: a
    # loop would launch kernels per chunk and operation there.
    if rows <= step or not torch_eager() or x.device.type != "cpu":
        return rowdot(x, a - b, -1)
    x, a, b = (ops.reshape(z, (rows, classes)) for z in (x, a, b))
    parts = [
        rowdot(x[i : i + step], a[i : i + step] - b[i : i + step], -1)
        for i in range(0, rows, step)
    ]
    return ops.reshape(ops.concatenate(parts, axis=0), lead + (1,))
