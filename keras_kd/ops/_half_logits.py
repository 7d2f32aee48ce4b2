"""Half-precision logits (bfloat16, float16), a block of rows at a time.

The softmax math runs in float32, and a float32 copy of a `[rows, classes]`
array is twice the size of the half-precision one: at 8192 x 128,256
bfloat16 logits (2.1 GB) each copy is 4.2 GB, and a plain computation
keeps several. On torch and JAX the dense divergences of half-precision
logits (`kl_divergence`, `symmetric_kl_divergence`,
`jensen_shannon_divergence`) instead cast one block of rows at a time: the
forward pass computes each block's values, the backward pass recomputes
each block's gradient and writes it in the logits' dtype. Beyond the
inputs, what lives is then their gradient, one value per row and one
block's float32 work.

The backward pass recomputes rather than keeping a gradient from the
forward pass: the upstream gradient is known there, so each entry is
rounded to half precision once (a kept half-precision gradient scaled
afterwards would be rounded twice), and a value computed without a
gradient (evaluation, metrics) costs nothing more.

TensorFlow keeps the whole-array path: without XLA, a write into a slice
of a tensor copies the tensor.
"""

import math

import keras
from keras import ops

from keras_kd.ops._chunk_engine import _on_accelerator, default_chunk_size
from keras_kd.ops._core import dtype_of

HALF = ("bfloat16", "float16")


def keeps_half(t, s, from_logits, axis):
    """Whether the logits `t` and `s` (the caller checks that their shapes
    match) are computed in blocks of rows in their own half-precision dtype.

    Logits of one block or less are cast whole instead: that copy is no
    larger than a block's work, and one pass then computes the value and
    the gradient together, where a block would be computed twice (in the
    forward pass, then again in the backward pass)."""
    if keras.backend.backend() not in ("torch", "jax") or not from_logits:
        return False
    if dtype_of(t) not in HALF or dtype_of(s) != dtype_of(t):
        return False
    shape = tuple(t.shape)
    if not shape or None in shape or not isinstance(axis, int):
        return False
    if axis not in (-1, len(shape) - 1):
        return False
    return math.prod(shape[:-1]) > rows_per_block(shape[-1])


def rows_per_block(classes):
    """Rows per block: the fused losses' chunk (`default_chunk_size`),
    8 MiB of float32 per block on a CPU and 128 MiB on a GPU."""
    return default_chunk_size(classes)


def over_row_blocks(block, inputs, outputs, size):
    """Runs `block(*rows)` over blocks of `size` rows of `inputs` (tensors
    with the same first axis) and gathers its per-row results.

    Args:
        block: returns one result per entry of `outputs` (`None` where
            that entry is `None`), each with the block's rows first.
        inputs: the tensors, `[n, ...]`.
        outputs: per result, `(trailing shape, dtype)`, or `None`.
        size: rows per block.

    Returns:
        A list of `[n, *trailing]` tensors (`None` where `outputs` is).
    """
    n = inputs[0].shape[0]
    if n <= size:
        return list(block(*inputs))
    if keras.backend.backend() == "torch":
        return _torch_blocks(block, inputs, outputs, size, n)
    kept = [i for i, spec in enumerate(outputs) if spec is not None]
    dtypes = [dtype_of(x) for x in inputs]
    # On a CPU, half-precision arrays move through the loop as their bits:
    # XLA's CPU compiler slices and updates bfloat16 arrays in float32,
    # converting the whole array (the inputs' conversion hoisted out of the
    # loop and kept, the output's redone at every step). GPUs slice half
    # precision natively.
    bits = not _on_accelerator()
    inputs = [_bits(x, bits) for x in inputs]

    def at(start, x):
        return [start] + [0] * (len(x.shape) - 1)

    def write(buffers, start, pieces):
        return tuple(
            ops.slice_update(buffer, at(start, buffer), _bits(pieces[i], bits))
            for buffer, i in zip(buffers, kept)
        )

    def run(rows, buffers, start):
        rows = [_unbits(x, dtype) for x, dtype in zip(rows, dtypes)]
        return write(buffers, start, block(*rows))

    def body(step, buffers):
        start = step * size
        rows = [
            ops.slice(x, at(start, x), [size] + list(x.shape[1:]))
            for x in inputs
        ]
        return run(rows, buffers, start)

    # A loop keeps one block's float32 work alive under XLA; the slice
    # updates are in place there.
    buffers = tuple(
        ops.zeros((n,) + tuple(outputs[i][0]), _bits_dtype(outputs[i][1], bits))
        for i in kept
    )
    full = n // size
    buffers = ops.fori_loop(0, full, body, buffers)
    if full * size < n:
        start = full * size
        buffers = run([x[start:] for x in inputs], buffers, start)
    found = [None] * len(outputs)
    for buffer, i in zip(buffers, kept):
        found[i] = _unbits(buffer, outputs[i][1])
    return found


def _bits_dtype(dtype, bits):
    return "uint16" if bits and dtype in HALF else dtype


def _bits(x, bits):
    return ops.view(x, "uint16") if bits and dtype_of(x) in HALF else x


def _unbits(x, dtype):
    return x if dtype_of(x) == dtype else ops.view(x, dtype)


def _torch_blocks(block, inputs, outputs, size, n):
    """torch: a Python loop writing into preallocated tensors (no list of
    pieces concatenated at the end, which would hold the results twice)."""
    import torch

    device = inputs[0].device
    buffers = [
        None
        if spec is None
        else torch.empty(
            (n,) + tuple(spec[0]), dtype=getattr(torch, spec[1]), device=device
        )
        for spec in outputs
    ]
    for start in range(0, n, size):
        pieces = block(*(x[start : start + size] for x in inputs))
        for buffer, piece in zip(buffers, pieces):
            if buffer is not None:
                buffer[start : start + size] = piece
    return buffers
