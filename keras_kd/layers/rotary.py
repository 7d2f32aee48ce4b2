"""Rotary position embedding (RoPE) as a pure function of `keras.ops`."""

import keras
from keras import ops


def rotary_embedding(x, max_wavelength=10000, position_axis=1):
    """Rotates pairs of features of `x` by angles proportional to position.

    Feature `i` of the first half and feature `i` of the second half form a
    pair, rotated at position `m` by the angle `m * theta_i` with
    `theta_i = max_wavelength ** (-2 i / d)`. The inner product of a rotated
    query at position `m` and a rotated key at position `n` then depends on
    `n - m` only: span scores see relative positions.

    Args:
        x: features `[batch, length, ..., d]` with an even last axis `d`.
        max_wavelength: the longest wavelength, `10000` as in RoFormer.
        position_axis: the axis that indexes positions.

    Returns:
        The rotated features, same shape and dtype as `x`.

    Reference:
        Su et al. RoFormer: Enhanced Transformer with Rotary Position
        Embedding. 2021. https://arxiv.org/abs/2104.09864
    """
    x = ops.convert_to_tensor(x)
    rank = len(x.shape)
    position_axis = position_axis % rank
    half = x.shape[-1] // 2
    length = ops.shape(x)[position_axis]
    positions = ops.cast(ops.arange(length), "float32")
    exponents = ops.cast(ops.arange(half), "float32") * (-2.0 / (2 * half))
    frequencies = ops.power(float(max_wavelength), exponents)
    angles = ops.expand_dims(positions, -1) * ops.expand_dims(frequencies, 0)
    # [length, half] -> broadcastable against x: singleton axes elsewhere.
    shape = [1] * rank
    shape[position_axis] = -1
    shape[-1] = half
    dtype = keras.backend.standardize_dtype(x.dtype)
    cos = ops.cast(ops.reshape(ops.cos(angles), shape), dtype)
    sin = ops.cast(ops.reshape(ops.sin(angles), shape), dtype)
    first, second = x[..., :half], x[..., half:]
    return ops.concatenate(
        [first * cos - second * sin, first * sin + second * cos], axis=-1
    )
