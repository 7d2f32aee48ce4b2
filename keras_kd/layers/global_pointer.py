"""GlobalPointer span heads: one logit per (type, start, end)."""

import math

import keras
from keras import ops

from keras_kd.api import export
from keras_kd.layers.rotary import rotary_embedding


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a positive "
            f"integer. Received: {name}={value}"
        )
    return value


def mask_span_logits(logits, mask=None, mask_lower_triangle=True):
    """Sets absent spans of `[batch, heads, length, length]` logits to -inf.

    A span `(start, end)` is absent when either token is padding or, with
    `mask_lower_triangle`, when `start > end`. `-inf` (rather than a large
    negative number) is what `MultilabelCategoricalCrossentropy`,
    `GlobalPointerKLDivergence` and `SpanF1` recognize as "not a candidate":
    such entries add nothing to losses or counts, and the gradient through
    `where` is exactly 0 there.

    Args:
        logits: span logits `[batch, heads, length, length]`.
        mask: optional boolean padding mask `[batch, length]`, `True` for
            real tokens.
        mask_lower_triangle: whether spans with `start > end` are absent.

    Returns:
        The logits with absent spans set to `-inf`.
    """
    keep = None
    if mask is not None:
        mask = ops.cast(mask, "bool")
        keep = ops.logical_and(mask[:, None, :, None], mask[:, None, None, :])
    if mask_lower_triangle:
        length = ops.shape(logits)[-1]
        positions = ops.arange(length)
        upper = positions[:, None] <= positions[None, :]
        upper = upper[None, None]
        keep = upper if keep is None else ops.logical_and(keep, upper)
    if keep is None:
        return logits
    return ops.where(keep, logits, ops.cast(-math.inf, logits.dtype))


class _SpanHead(keras.layers.Layer):
    """What both GlobalPointer variants share: arguments, masks, config."""

    def __init__(
        self,
        heads,
        head_size,
        use_rope=True,
        mask_lower_triangle=True,
        max_wavelength=10000,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.heads = _check_positive_int(heads, "heads")
        self.head_size = _check_positive_int(head_size, "head_size")
        if use_rope and head_size % 2:
            raise ValueError(
                "Invalid value for argument `head_size`. Expected an even "
                "number when `use_rope=True` (features rotate in pairs). "
                f"Received: head_size={head_size}"
            )
        self.use_rope = bool(use_rope)
        self.mask_lower_triangle = bool(mask_lower_triangle)
        self.max_wavelength = max_wavelength
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        # The padding mask is consumed here: the output grid carries it as
        # -inf, so no Keras mask is passed on.
        self.supports_masking = True

    def _dense(self, units, name):
        return keras.layers.Dense(
            units,
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
            name=name,
        )

    def _rope(self, x):
        if not self.use_rope:
            return x
        return rotary_embedding(x, self.max_wavelength, position_axis=1)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        length = input_shape[1]
        return (input_shape[0], self.heads, length, length)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "heads": self.heads,
                "head_size": self.head_size,
                "use_rope": self.use_rope,
                "mask_lower_triangle": self.mask_lower_triangle,
                "max_wavelength": self.max_wavelength,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config


@export
class GlobalPointer(_SpanHead):
    """GlobalPointer: span logits from token encodings, one head per type.

    Each head projects every token to a query and a key of `head_size`
    features (rotated by position with RoPE); the logit of the span
    `(start, end)` of type `h` is the scaled inner product of the start
    token's query and the end token's key:

    Formula:

    ```
    logits[b, h, m, n] = <R_m q[b, m, h], R_n k[b, n, h]> / sqrt(head_size)
    ```

    A span is predicted where its logit is `> 0`; train with
    `keras_kd.losses.MultilabelCategoricalCrossentropy` (or its sparse
    form). Spans over padding and, by default, spans with `start > end` are
    set to `-inf`. The padding mask comes from the Keras mask of the inputs
    (e.g. `Embedding(mask_zero=True)` upstream) or from `mask=` in the call.

    Args:
        heads: the number of span types.
        head_size: query/key size per head (even when `use_rope`).
        use_rope: whether to apply rotary position embedding, which makes
            the scores aware of relative position (span length).
        mask_lower_triangle: whether spans with `start > end` are `-inf`.
        max_wavelength: RoPE's longest wavelength.
        use_bias: whether the projection has a bias.
        kernel_initializer: initializer of the projection kernel.
        bias_initializer: initializer of the projection bias.
        **kwargs: `keras.layers.Layer` arguments (`name`, `dtype`).

    Call arguments:
        inputs: token encodings `[batch, length, hidden]`.
        mask: optional boolean padding mask `[batch, length]`.

    Returns:
        Span logits `[batch, heads, length, length]`.

    Example:

    ```python
    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(vocab, 64, mask_zero=True)(tokens)
    gru = keras.layers.GRU(64, return_sequences=True)
    x = keras.layers.Bidirectional(gru)(x)
    logits = keras_kd.layers.GlobalPointer(heads=4, head_size=32)(x)
    ```

    Reference:
        Su. GlobalPointer: 用统一的方式处理嵌套和非嵌套NER. 2021.
        https://spaces.ac.cn/archives/8373
    """

    def __init__(self, heads, head_size, use_rope=True, **kwargs):
        super().__init__(heads, head_size, use_rope=use_rope, **kwargs)
        self.projection = self._dense(2 * heads * head_size, "projection")

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.built = True

    def call(self, inputs, mask=None):
        projected = self.projection(inputs)
        shape = ops.shape(projected)
        projected = ops.reshape(
            projected, (shape[0], shape[1], self.heads, 2 * self.head_size)
        )
        query = self._rope(projected[..., : self.head_size])
        key = self._rope(projected[..., self.head_size :])
        logits = ops.einsum("bmhd,bnhd->bhmn", query, key) / math.sqrt(
            self.head_size
        )
        return mask_span_logits(logits, mask, self.mask_lower_triangle)


@export
class EfficientGlobalPointer(_SpanHead):
    """Efficient GlobalPointer: one shared span score plus per-type biases.

    All types share one query/key projection (so the parameter count no
    longer grows with `heads * head_size`); each type adds a start bias and
    an end bias read from the projected tokens:

    Formula:

    ```
    logits[b, h, m, n] = <R_m q[b, m], R_n k[b, n]> / sqrt(head_size)
                         + start[b, m, h] + end[b, n, h]
    ```

    Masking, arguments and outputs are those of `GlobalPointer`.

    Args:
        heads: the number of span types.
        head_size: size of the shared query/key (even when `use_rope`).
        use_rope: whether to apply rotary position embedding.
        **kwargs: the other `GlobalPointer` arguments and `Layer` arguments.

    Reference:
        Su. Efficient GlobalPointer: 少点参数,多点效果. 2022.
        https://spaces.ac.cn/archives/8877
    """

    def __init__(self, heads, head_size, use_rope=True, **kwargs):
        super().__init__(heads, head_size, use_rope=use_rope, **kwargs)
        self.projection = self._dense(2 * head_size, "projection")
        self.type_bias = self._dense(2 * heads, "type_bias")

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.type_bias.build(tuple(input_shape[:-1]) + (2 * self.head_size,))
        self.built = True

    def call(self, inputs, mask=None):
        projected = self.projection(inputs)
        query = self._rope(projected[..., : self.head_size])
        key = self._rope(projected[..., self.head_size :])
        shared = ops.einsum("bmd,bnd->bmn", query, key) / math.sqrt(
            self.head_size
        )
        bias = ops.transpose(self.type_bias(projected), (0, 2, 1))
        start = bias[:, : self.heads, :, None]
        end = bias[:, self.heads :, None, :]
        logits = shared[:, None] + start + end
        return mask_span_logits(logits, mask, self.mask_lower_triangle)
