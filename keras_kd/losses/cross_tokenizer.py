"""Losses between a teacher and a student with different tokenizers: ULD
and the hybrid distance."""

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd.api import export
from keras_kd.losses.base import DivergenceLoss


class CrossVocabularyLoss(DivergenceLoss):
    """Base of the losses that compare distributions over two different
    vocabularies. `distance` names the distance by the name
    `keras_kd.ops.fused_linear_logit_distance` takes, so that
    `CausalLMDistiller` computes the same loss from hidden states over
    aligned token groups."""

    distance = None


@export
class UniversalLogitDistance(CrossVocabularyLoss):
    """Universal logit distance (ULD): the L1 distance of the sorted
    teacher and student probabilities, for models with different
    tokenizers.

    Sorting forgets which token is which, so the two vocabularies need not
    correspond, nor be of one size (the shorter sorted vector is padded
    with zeros). Given as `distillation_loss` of a `CausalLMDistiller`
    whose teacher has another tokenizer, it is computed from hidden states
    over the aligned token groups of each text (`keras_kd.align_tokens`),
    chunk by chunk; called on logits, it compares rows by position.

    Formula:

    ```
    P = softmax(y_true / T), Q = softmax(y_pred / T)
    loss = T**2 * sum_k |sort(Q)_k - sort(P)_k|     # per row, in [0, 2 T**2]
    ```

    Boizard et al. add it to the student's cross-entropy with weight 1.5;
    in a distiller `alpha = 0.4` gives that ratio
    (`alpha * CE + (1 - alpha) * ULD`).

    Args:
        temperature: softening temperature `T > 0`.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.

    Example:

    ```python
    loss = keras_kd.losses.UniversalLogitDistance()
    loss(teacher_logits, student_logits)  # [..., V_t] and [..., V_s]
    ```

    Reference:
        Boizard et al. Towards Cross-Tokenizer Distillation: the Universal
        Logit Distillation Loss for LLMs. 2024.
        https://arxiv.org/abs/2402.12030
    """

    fn = staticmethod(kd_ops.universal_logit_distance)
    _fn_args = ("temperature",)
    distance = "universal"

    def __init__(
        self,
        temperature=1.0,
        reduction="sum_over_batch_size",
        name="universal_logit_distance",
        dtype=None,
    ):
        super().__init__(reduction, name, dtype, temperature=temperature)


@export
class HybridLogitDistance(CrossVocabularyLoss):
    """The hybrid cross-tokenizer distance: the generalized Jensen-Shannon
    divergence on the tokens both vocabularies share, ULD's sorted L1 on
    the others.

    Given as `distillation_loss` of a `CausalLMDistiller` whose teacher has
    another tokenizer, the shared tokens are found once from the two
    tokenizers (tokens that stand for the same text,
    `keras_kd.match_vocabularies`) and the loss is computed from hidden
    states over the aligned token groups of each text, chunk by chunk.
    Called on logits, it takes one shared vocabulary (equal last axes):
    then every token is shared and the value is `JensenShannonDivergence`'s.
    For two vocabularies in a custom loop, see
    `keras_kd.ops.hybrid_logit_distance(..., matched_ids=...)`.

    Formula:

    ```
    p, q = P[teacher_ids], Q[student_ids]        # not renormalized
    M = beta p + (1 - beta) q
    loss = T**2 * (sum beta p log(p / M) + (1 - beta) q log(q / M)
                   + sum_k |sort(Q[rest])_k - sort(P[rest])_k|)
    ```

    At `beta = 0` the shared part is the (generalized) forward KL
    `sum p log(p / q) - p + q`, at `beta = 1` the reverse.

    Args:
        beta: the JSD's mixing weight in `[0, 1]`.
        temperature: softening temperature `T > 0`.
        reduction: a Keras reduction, default `"sum_over_batch_size"`.
        name: the loss name.
        dtype: the dtype of the loss computation.
    """

    fn = staticmethod(kd_ops.hybrid_logit_distance)
    _fn_args = ("beta", "temperature")
    distance = "hybrid"

    def __init__(
        self,
        beta=0.5,
        temperature=1.0,
        reduction="sum_over_batch_size",
        name="hybrid_logit_distance",
        dtype=None,
    ):
        super().__init__(
            reduction,
            name,
            dtype,
            beta=_checks.fraction("beta", beta),
            temperature=temperature,
        )
