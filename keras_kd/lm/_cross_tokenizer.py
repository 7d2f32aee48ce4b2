"""A `CausalLMDistiller` whose teacher has another tokenizer: the aligned
batch, its checks, and the loss of one step (ULD or the hybrid distance
over aligned token groups, from both models' hidden states).

A batch is what `keras_kd.align_tokens` returns. Per row: the student's
and the teacher's token ids of one text, the response tokens the student's
cross-entropy trains on, and the groups: stretches of the text that are
one or more tokens on each side. A group's distribution on each side is
the model's next-token distribution before the group's first token, times
the model's probability of the group's later tokens (each side's own
tokens; so a word that is one teacher token and three student tokens is
compared as one event). The scale is differentiable for the student:
`fused_linear_token_log_probs` gives the log-probabilities of every
response token, which also make the cross-entropy.
"""

from keras import ops

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd._model_utils import frozen_call
from keras_kd.lm import _keras_hub as hub
from keras_kd.lm._cross_generation import epoch_data
from keras_kd.lm._token_bytes import tokenizer_of, vocabulary_match
from keras_kd.lm.alignment import ALIGNMENTS, align_tokens
from keras_kd.losses.cross_tokenizer import CrossVocabularyLoss

# The arrays of an aligned batch (`keras_kd.align_tokens`).
ALIGNED_KEYS = (
    "token_ids",
    "padding_mask",
    "teacher_token_ids",
    "teacher_padding_mask",
    "response_mask",
    "student_groups",
    "teacher_groups",
    "student_group_starts",
    "teacher_group_starts",
    "group_mask",
)


def is_aligned(x):
    return isinstance(x, dict) and "teacher_token_ids" in x


def _tokenizer(model, name):
    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise _checks.invalid(
            name,
            "a CausalLM with a preprocessor and its tokenizer (e.g. built "
            "with `preprocessor=LlamaCausalLMPreprocessor(tokenizer)`): "
            "distilling across tokenizers aligns both tokenizations of "
            "each text",
            model,
        )
    return tokenizer_of(tokenizer)


def _vocabulary(tokenizer):
    return list(tokenizer.get_vocabulary())


def check_same_vocabulary(distiller):
    """A `ValueError` when an exact divergence would compare the ids of two
    different vocabularies."""
    if distiller.teacher is None:
        return
    kernel, layout, _ = hub.output_head(distiller.student, "student")
    t_kernel, t_layout, _ = hub.output_head(distiller.teacher, "teacher")
    sizes = [
        k.shape[1] if lay == "hv" else k.shape[0]
        for k, lay in ((kernel, layout), (t_kernel, t_layout))
    ]
    tokenizers = [
        getattr(getattr(m, "preprocessor", None), "tokenizer", None)
        for m in (distiller.student, distiller.teacher)
    ]
    differ = sizes[1] < sizes[0]
    if not differ and None not in tokenizers:
        try:
            vocabularies = [_vocabulary(t) for t in tokenizers]
        except ValueError:
            return  # a reloaded model's vocabulary is not loaded yet
        sizes = [len(v) for v in vocabularies]
        differ = vocabularies[0] != vocabularies[1]
    if differ:
        raise _checks.invalid(
            "distillation_loss",
            "`keras_kd.losses.UniversalLogitDistance` or "
            "`HybridLogitDistance` for a teacher with another tokenizer "
            f"(the student's vocabulary has {sizes[0]} tokens, the "
            f"teacher's {sizes[1]}, not the same tokens): an exact "
            "divergence compares token ids one to one",
            distiller.distillation_loss,
        )


class CrossTokenizer:
    """What a distiller needs to distill across tokenizers: both
    tokenizers (checked at `compile`), their vocabulary sizes and, for the
    hybrid distance, the pairs of ids that stand for the same text (found
    at the first step: a reloaded model's vocabularies come after its
    `compile`)."""

    def __init__(self, distiller, loss, alignment):
        if distiller.teacher is None:
            raise _checks.invalid(
                "distillation_loss",
                "`keras_kd.losses.KLDivergence` without a teacher (a top-k "
                "cache holds the student's own token ids; the distances "
                "across tokenizers need the teacher model)",
                loss,
            )
        self.alignment = _checks.choice("alignment", alignment, ALIGNMENTS)
        self.tokenizers = (
            _tokenizer(distiller.student, "student"),
            _tokenizer(distiller.teacher, "teacher"),
        )
        self.loss = loss

    @property
    def sizes(self):
        return tuple(int(t.vocabulary_size()) for t in self.tokenizers)

    @property
    def matched_ids(self):
        if self.loss.distance != "hybrid":
            return None
        return vocabulary_match(*self.tokenizers)  # cached per pair

    def arrays(self, distiller, x, name):
        """The aligned batch of raw text `x` (strings or prompt/response
        pairs), by both models' preprocessors."""
        if hub.is_text_pairs(x) and "responses" not in x:
            raise _checks.invalid(
                name,
                '`{"prompts", "responses"}`: a teacher with another '
                "tokenizer needs the responses' text",
                x,
            )
        return align_tokens(
            distiller.student.preprocessor,
            distiller.teacher.preprocessor,
            x,
            alignment=self.alignment,
        )

    def terms(self, distiller, x, y_pred, alpha):
        """`(total, cross_entropy, distance)` of an aligned batch."""
        kernel, layout, cap = hub.output_head(distiller.student, "student")
        t_kernel, t_layout, t_cap = hub.output_head(
            distiller.teacher, "teacher"
        )
        size = distiller.chunk_size
        student = _side(
            x, "token_ids", "student_groups", "student_group_starts"
        )
        teacher = _side(
            x, "teacher_token_ids", "teacher_groups", "teacher_group_starts"
        )
        response = ops.cast(x["response_mask"][:, 1:], "bool")
        log_p = kd_ops.fused_linear_token_log_probs(
            y_pred[:, :-1],
            kernel,
            student["labels"],
            mask=ops.logical_or(response, student["later"]),
            chunk_size=size,
            kernel_layout=layout,
            logit_soft_cap=cap,
        )
        weights = ops.cast(response, log_p.dtype)
        logged = _mean(log_p, weights)
        trained = logged
        if "student_written" in x:
            # No cross-entropy on the student's own samples (logged all
            # the same, as on a same-tokenizer on-policy step).
            own = ops.cast(x["student_written"], log_p.dtype)
            lengths = ops.sum(weights, axis=1) * own
            distiller.generated_length_tracker.update_state(
                ops.mean(lengths), sample_weight=ops.shape(own)[0]
            )
            trained = _mean(log_p, weights * (1.0 - own[:, None]))
        teacher_hidden = frozen_call(
            distiller.teacher.backbone,
            {
                "token_ids": x["teacher_token_ids"],
                "padding_mask": x["teacher_padding_mask"],
            },
        )
        t_log_p = kd_ops.fused_linear_token_log_probs(
            teacher_hidden[:, :-1],
            t_kernel,
            teacher["labels"],
            mask=teacher["later"],
            chunk_size=size,
            kernel_layout=t_layout,
            logit_soft_cap=t_cap,
        )
        group_mask = x["group_mask"]
        distance = kd_ops.fused_linear_logit_distance(
            _at_starts(y_pred, student["starts"]),
            kernel,
            _at_starts(teacher_hidden, teacher["starts"]),
            t_kernel,
            mask=group_mask,
            distance=self.loss.distance,
            beta=getattr(self.loss, "beta", 0.5),
            temperature=distiller.temperature,
            student_log_scale=_group_sums(log_p, student, group_mask),
            teacher_log_scale=ops.stop_gradient(
                _group_sums(t_log_p, teacher, group_mask)
            ),
            matched_ids=self.matched_ids,
            chunk_size=size,
            student_kernel_layout=layout,
            teacher_kernel_layout=t_layout,
            student_logit_soft_cap=cap,
            teacher_logit_soft_cap=t_cap,
            student_vocabulary_size=self.sizes[0],
            teacher_vocabulary_size=self.sizes[1],
        )
        alpha = ops.cast(alpha, distance.dtype)
        total = alpha * trained + (1.0 - alpha) * distance
        return total, ops.stop_gradient(logged), ops.stop_gradient(distance)


def _mean(log_p, weights):
    """The cross-entropy: the weighted mean of `-log_p` (0 for no weight)."""
    count = ops.maximum(ops.sum(weights), 1.0)
    return -ops.sum(log_p * weights) / count


def _side(x, ids_key, groups_key, starts_key):
    """One side's labels (tokens 1..), the group of each label, which
    labels are a group's later tokens, and the group starts."""
    ids = ops.cast(x[ids_key], "int32")
    groups = ops.cast(x[groups_key], "int32")[:, 1:]
    starts = ops.cast(x[starts_key], "int32")
    # Label j is token j + 1; a later token is one past its group's first.
    first = ops.take_along_axis(starts, ops.maximum(groups, 0), axis=1)
    position = ops.arange(1, ops.shape(ids)[1], dtype="int32")
    later = ops.logical_and(groups >= 0, position[None, :] != first)
    return {
        "labels": ids[:, 1:],
        "groups": groups,
        "later": later,
        "starts": starts,
    }


def _group_sums(log_p, side, group_mask):
    """Per group, the sum of the log-probabilities of its later tokens:
    `[batch, length] -> [batch, groups]`, through a one-hot product (no
    scatter, differentiable on every backend)."""
    count = ops.shape(group_mask)[1]
    hit = ops.expand_dims(side["groups"], -1) == ops.arange(
        count, dtype="int32"
    )
    hit = ops.logical_and(hit, ops.expand_dims(side["later"], -1))
    return ops.einsum("bl,blg->bg", log_p, ops.cast(hit, log_p.dtype))


def _at_starts(hidden, starts):
    """The hidden state before each group's first token: `[batch, groups,
    hidden]`."""
    index = ops.expand_dims(ops.maximum(starts - 1, 0), -1)
    shape = (ops.shape(starts)[0], ops.shape(starts)[1], hidden.shape[-1])
    return ops.take_along_axis(hidden, ops.broadcast_to(index, shape), axis=1)


def plan(distiller, loss, responses):
    """A `CrossTokenizer` for a cross-vocabulary loss; else `None`, after
    checking that an exact divergence compares one vocabulary."""
    if not isinstance(loss, CrossVocabularyLoss):
        check_same_vocabulary(distiller)
        return None
    if responses.sequence_kd:
        raise _checks.invalid(
            "sequence_kd",
            "`False` for a teacher with another tokenizer (the teacher "
            "would write in its own tokens, from prompts tokenized its way; "
            "on-policy generation is available)",
            responses.sequence_kd,
        )
    return CrossTokenizer(distiller, loss, distiller.alignment)


def text_arrays(distiller, x, y, fit_kwargs, name, fit=False):
    """`_keras_hub.text_arrays`, or the aligned batch of raw text for a
    teacher with another tokenizer: for `fit` with on-policy generation,
    a dataset whose responses the student rewrites every epoch."""
    generates = fit and distiller._cross and distiller._responses.generates
    if generates and not hub.is_raw_text(x):
        raise _checks.invalid(
            name,
            "raw text (strings, or prompts and responses) for on-policy "
            "distillation from a teacher with another tokenizer: the "
            "student's samples are decoded and aligned again every epoch",
            type(x).__name__,
        )
    if distiller._cross is None or not hub.is_raw_text(x):
        if isinstance(x, dict):
            # Checked here too: an error inside a JAX step leaves the
            # models' variables purged.
            check_batch(distiller, x, y, fit_kwargs.get("sample_weight"))
        return hub.text_arrays(distiller, x, y, fit_kwargs, name)
    hub.check_no_labels(y, fit_kwargs, name)
    if generates:
        data, fit_kwargs = epoch_data(distiller, x, fit_kwargs, name)
        return data, None, fit_kwargs
    return distiller._cross.arrays(distiller, x, name), None, fit_kwargs


def check_batch(distiller, x, y, sample_weight):
    """A `ValueError` unless an aligned batch meets a cross-vocabulary
    loss (with its arrays, and no `y` nor `sample_weight`), and only one."""
    if distiller._cross is None and not is_aligned(x):
        return
    if distiller._cross is None or not is_aligned(x):
        raise ValueError(
            "A batch aligned across tokenizers (`teacher_token_ids` in `x`) "
            "needs `distillation_loss=UniversalLogitDistance()` or "
            "`HybridLogitDistance()`, and those need such a batch. Received: "
            f"x with keys {sorted(x) if isinstance(x, dict) else type(x)}, "
            f"distillation_loss={distiller.distillation_loss}"
        )
    missing = [k for k in ALIGNED_KEYS if k not in x]
    if missing:
        raise _checks.invalid(
            "x",
            "an aligned batch with the arrays of `keras_kd.align_tokens` "
            f"(missing {missing})",
            sorted(x),
        )
    if y is not None or sample_weight is not None:
        raise ValueError(
            "An aligned batch carries its own labels and weights "
            "(`response_mask`): pass neither `y` nor `sample_weight`. "
            f"Received: y={type(y).__name__}, sample_weight="
            f"{type(sample_weight).__name__}"
        )


def terms(distiller, x, y, y_pred, sample_weight, alpha):
    """`(total, cross_entropy, distance)` of a step on an aligned batch."""
    check_batch(distiller, x, y, sample_weight)
    return distiller._cross.terms(distiller, x, y_pred, alpha)
