"""Losses between feature maps, for hint (feature) distillation.

`y_true` is the teacher's feature map and `y_pred` the student's (after
any projection). Each returns one value per example, so `sample_weight`
of shape `[batch]` applies; the default reduction averages over examples.
"""

from keras_kd import _checks
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss
from keras_kd.ops import _features


@export
class FeatureMeanSquaredError(DivergenceLoss):
    """Mean squared error of feature maps (FitNets hints), per example.

    Formula:

    ```
    loss = mean((y_pred - y_true)**2)   # over all axes but the batch
    ```

    Args:
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.

    Reference:
        Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015.
        https://arxiv.org/abs/1412.6550
    """

    fn = staticmethod(_features.feature_mean_squared_error)

    def __init__(
        self,
        reduction="sum_over_batch_size",
        name="feature_mean_squared_error",
        dtype=None,
    ):
        super().__init__(reduction, name, dtype)


@export
class FeatureCosineDistance(DivergenceLoss):
    """`1 - cos(teacher, student)` of feature vectors, in `[0, 2]`.

    The vectors lie along `axis` (channels); over the positions of a
    feature map the distance is averaged. Insensitive to the scale of
    either feature map.

    Formula:

    ```
    loss = mean(1 - <t, s> / (|t| |s|))   # over positions
    ```

    Args:
        axis: the channel axis.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
    """

    fn = staticmethod(_features.feature_cosine_distance)
    _fn_args = ("axis",)

    def __init__(
        self,
        axis=-1,
        reduction="sum_over_batch_size",
        name="feature_cosine_distance",
        dtype=None,
    ):
        super().__init__(reduction, name, dtype, axis=axis)


@export
class AttentionTransfer(DivergenceLoss):
    """Attention transfer (Zagoruyko and Komodakis, ICLR 2017).

    Compares where the two networks put their activation energy: each
    feature map is reduced over its channels to `mean(|F|**p)` per position,
    flattened and scaled to unit L2 norm. Teacher and student may differ in
    channel count, never in positions (height, width, tokens).

    Formula:

    ```
    q = A / ||A||_2,  A = mean(|F|**p, axis=channels)
    loss = sum((q_student - q_teacher)**2)   # over positions, in [0, 4]
    ```

    The paper's `beta / 2 * mean(...)` over positions (with `beta = 1000`)
    is this loss times `beta / (2 * positions)`: set the feature weight
    accordingly to reproduce it.

    Args:
        p: the power of the channel energy (2 in the paper).
        axis: the channel axis.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.

    Reference:
        Zagoruyko, Komodakis. Paying More Attention to Attention. ICLR 2017.
        https://arxiv.org/abs/1612.03928
    """

    fn = staticmethod(_features.attention_transfer)
    _fn_args = ("p", "axis")

    def __init__(
        self,
        p=2,
        axis=-1,
        reduction="sum_over_batch_size",
        name="attention_transfer",
        dtype=None,
    ):
        p = _checks.number("p", p, low=0.0, low_open=True)
        super().__init__(reduction, name, dtype, p=p, axis=axis)
