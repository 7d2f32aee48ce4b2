"""Losses between intermediate feature maps (hint distillation).

Each function compares a teacher feature map `y_true` with a student
feature map `y_pred` and returns one value per example (every axis but the
first is reduced), so that `sample_weight` of shape `[batch]` weights them
in `keras.losses.Loss.__call__`.
"""

import math

from keras import ops

from keras_kd.ops._core import _as_float, _pair, _reduce_max


def _non_batch_axes(x):
    return tuple(range(1, len(x.shape)))


def _mean_over_non_batch(x):
    axes = _non_batch_axes(x)
    return ops.mean(x, axis=axes) if axes else x


def _safe_unit(x, axis):
    """`x / ||x||` along `axis`; an all-zero vector stays zero.

    The vector is first divided by its largest magnitude (a constant for the
    gradient: the result does not depend on the scale), so its squares
    neither overflow nor underflow; the square root never sees 0, so the
    gradient is finite for zero vectors.
    """
    top = _reduce_max(ops.abs(x), axis)
    top = ops.stop_gradient(ops.where(top > 0, top, 1.0))
    x = x / top
    squared = ops.sum(ops.square(x), axis=axis, keepdims=True)
    nonzero = squared > 0
    norm = ops.sqrt(ops.where(nonzero, squared, 1.0))
    return ops.where(nonzero, x / norm, 0.0)


def feature_mean_squared_error(y_true, y_pred):
    """Mean squared error of two feature maps, per example.

    Formula:

    ```
    loss = mean((y_pred - y_true)**2)   # over every axis but the batch
    ```

    Args:
        y_true: the teacher's features `[batch, ...]`.
        y_pred: the student's features (after any projection), same shape.

    Returns:
        `[batch]`.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    return _mean_over_non_batch(ops.square(y_pred - y_true))


def feature_cosine_distance(y_true, y_pred, axis=-1):
    """One minus the cosine similarity of feature vectors, per example.

    The vectors lie along `axis` (the channels); for feature maps with
    positions (`[batch, height, width, channels]`, `[batch, tokens,
    channels]`) the distance is averaged over the positions. A zero vector
    has cosine 0 with anything (distance 1).

    Formula:

    ```
    loss = mean(1 - sum(u * v, axis=axis)),  u = t / |t|, v = s / |s|
    ```

    Args:
        y_true: the teacher's features.
        y_pred: the student's features (after any projection), same shape.
        axis: the channel axis.

    Returns:
        `[batch]`, values in `[0, 2]`.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    cosine = ops.sum(
        _safe_unit(y_true, axis) * _safe_unit(y_pred, axis), axis=axis
    )
    return _mean_over_non_batch(1.0 - cosine)


def attention_map(features, p=2, axis=-1):
    """The normalized spatial attention map of a feature map.

    The channel energy `mean(|F|**p)` over `axis` at each position,
    flattened over the positions and scaled to unit L2 norm (Zagoruyko and
    Komodakis, 2017). The map does not depend on the number of channels, so
    teacher and student may differ in width.

    Args:
        features: `[batch, ..., channels]` (channels on `axis`).
        p: the power of the channel energy (2 in the paper).
        axis: the channel axis.

    Returns:
        `[batch, positions]` with rows of unit norm (or zero rows).
    """
    features = _as_float(features)
    if len(features.shape) < 3:
        raise ValueError(
            "Invalid value for argument `features`. Expected a feature map "
            "with positions, [batch, ..., channels]. Received: "
            f"features.shape={tuple(features.shape)}"
        )
    # The map is invariant to the scale of the features; dividing by the
    # largest magnitude first keeps |F|**p finite for large activations.
    axes = _non_batch_axes(features)
    top = _reduce_max(ops.abs(features), axes)
    top = ops.stop_gradient(ops.where(top > 0, top, 1.0))
    energy = ops.mean(ops.power(ops.abs(features / top), p), axis=axis)
    if None in tuple(energy.shape[1:]):
        energy = ops.reshape(energy, (ops.shape(energy)[0], -1))
    else:
        # A static width reshapes an empty batch too ((0, -1) is ambiguous).
        energy = ops.reshape(energy, (-1, math.prod(energy.shape[1:])))
    return _safe_unit(energy, axis=-1)


def attention_transfer(y_true, y_pred, p=2, axis=-1):
    """Attention transfer: squared distance of normalized attention maps.

    Formula:

    ```
    q = A / ||A||_2,  A = mean(|F|**p, axis=channels)   # per position
    loss = sum((q_student - q_teacher)**2)   # over positions, in [0, 4]
    ```

    Only the positions must match: teacher and student may have different
    channel counts. The paper writes the (unsquared) L2 norm of the
    difference; its reference code averages the squared differences over
    positions, i.e. this value divided by the number of positions, times
    `beta / 2` with `beta = 1000`.

    Args:
        y_true: the teacher's feature map `[batch, ..., channels_t]`.
        y_pred: the student's feature map `[batch, ..., channels_s]`.
        p: the power of the channel energy.
        axis: the channel axis.

    Returns:
        `[batch]`.

    Reference:
        Zagoruyko, Komodakis. Paying More Attention to Attention: Improving
        the Performance of Convolutional Neural Networks via Attention
        Transfer. ICLR 2017. https://arxiv.org/abs/1612.03928
    """
    q_true = attention_map(y_true, p, axis)
    q_pred = attention_map(y_pred, p, axis)
    if (
        q_true.shape[-1] is not None
        and q_pred.shape[-1] is not None
        and q_true.shape[-1] != q_pred.shape[-1]
    ):
        raise ValueError(
            "Arguments `y_true` and `y_pred` must have the same positions "
            "(all axes but the batch and channel axes). Received: "
            f"y_true.shape={tuple(y_true.shape)}, "
            f"y_pred.shape={tuple(y_pred.shape)}"
        )
    q_true = ops.cast(q_true, q_pred.dtype)
    return ops.sum(ops.square(q_pred - q_true), axis=-1)
