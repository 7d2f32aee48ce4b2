"""`CausalLMDistiller`: distill a keras-hub causal language model from a
larger one, or from its cached top-k outputs, without building either
model's logits."""

from keras import ops

from keras_kd import _checks
from keras_kd import losses as kd_losses
from keras_kd import ops as kd_ops
from keras_kd._model_utils import (
    batch_size,
    frozen_call,
    inputs_for,
    is_placeholder,
    unscale_for_replicas,
)
from keras_kd.api import export
from keras_kd.distillers.distiller import Distiller
from keras_kd.lm import _keras_hub as hub
from keras_kd.lm import top_k_cache

# The divergences the fused language-model ops compute.
_FUSED_DIVERGENCES = ("kl", "reverse_kl", "jsd")


def _divergence_of(loss):
    if (
        isinstance(loss, kd_losses.DivergenceLoss)
        and loss.divergence in _FUSED_DIVERGENCES
        and getattr(loss, "from_logits", True)
    ):
        return loss.divergence
    raise _checks.invalid(
        "distillation_loss",
        "`keras_kd.losses.KLDivergence`, `ReverseKLDivergence` or "
        "`JensenShannonDivergence` on logits (the losses the fused "
        "language-model kernels compute)",
        loss,
    )


@export
class CausalLMDistiller(Distiller):
    """Distills a keras-hub causal language model, logits never built.

    Student and teacher are keras-hub `CausalLM` models (GPT2, Llama,
    Gemma, Mistral, Qwen, ...) over the same vocabulary (the teacher's may
    be padded with extra ids, which are ignored). Each step runs both
    backbones once (the teacher in inference mode, gradient-free) and
    applies the output heads chunk by chunk over the tokens with
    `keras_kd.ops.fused_linear_distillation_loss`: the `[tokens, vocab]`
    logits of neither model exist at any time, and the student's
    gradients are formed inside the same pass.

    Offline, without a teacher (`CausalLMDistiller(student)`), the teacher
    comes from a cache of its top-k log-probabilities and tail mass per
    token (`keras_kd.cache_causal_lm_top_k`) whose arrays are given in `x`
    beside the student's inputs; the loss is then the exact KL between
    the teacher's `k + 1` buckets and the student's distribution over the
    same buckets (`keras_kd.ops.fused_linear_top_k_distillation_loss`),
    the full KL at `k = vocab`. Only `KLDivergence` is available offline,
    at the temperature the cache was made at (another gives a NaN loss
    and no update).

    Formula:

    ```
    loss = alpha * CE(y, student)              # next-token, mean over tokens
           + (1 - alpha) * T**2 * D(teacher || student)   # mean over tokens
    ```

    with `D` the KL, reverse KL or generalized JSD of the compiled
    `distillation_loss` at its temperature `T` (offline: the KL of the
    bucketed distributions). Real tokens are those with a nonzero
    `sample_weight` (keras-hub's `CausalLMPreprocessor` gives the padding
    mask there), else those of `x["padding_mask"]`. Without labels
    the loss is the divergence alone. History: `loss`, `student_loss`
    (with labels), `distillation_loss`.

    Calling the distiller returns the student's final hidden states (what
    the loss takes); `distiller.student` is the plain keras-hub model, for
    logits, `generate` and saving (it reloads without keras-kd). The
    teacher is frozen as in `Distiller`.

    Args:
        student: the keras-hub `CausalLM` to train.
        teacher: a built keras-hub `CausalLM`, or `None` to train from
            a top-k cache given with each batch.
        chunk_size: tokens per chunk of the fused loss (`None`: chosen so
            one chunk's logits stay small).
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    teacher = keras_hub.models.Llama3CausalLM.from_preset("llama3.2_3b")
    student = keras_hub.models.Llama3CausalLM.from_preset("llama3.2_1b")
    distiller = keras_kd.CausalLMDistiller(student, teacher)
    distiller.compile(
        keras.optimizers.AdamW(1e-5),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=1.0),
        alpha=0.5,
    )
    distiller.fit(texts, batch_size=4)  # raw text: student.preprocessor
    x, y, w = student.preprocessor(texts)  # or token_ids/padding_mask,
    distiller.fit(x, y, sample_weight=w, batch_size=4)  # labels, mask

    # Offline: the teacher runs once, before training.
    cache = keras_kd.cache_causal_lm_top_k(teacher, x, k=64, path="cache")
    offline = keras_kd.CausalLMDistiller(student)
    offline.compile(keras.optimizers.AdamW(1e-5), alpha=0.5)
    offline.fit({**x, **cache}, y, sample_weight=w, batch_size=4)
    ```
    """

    def __init__(self, student, teacher=None, chunk_size=None, **kwargs):
        hub.check_causal_lm("student", student)
        if teacher is not None:
            hub.check_causal_lm("teacher", teacher)
        super().__init__(student, teacher, **kwargs)
        if chunk_size is not None:
            chunk_size = _checks.integer("chunk_size", chunk_size, low=1)
        self.chunk_size = chunk_size

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; `x` may also be raw text (a list or array of
        strings), tokenized by the student's keras-hub preprocessor into
        token ids, next-token labels and the padding mask as
        `sample_weight` (then give no `y` nor `sample_weight`).
        `validation_data` may be raw text too."""
        x, y, kwargs = self._from_text(x, y, kwargs)
        if hub.is_text(kwargs.get("validation_data")):
            text = kwargs["validation_data"]
            kwargs["validation_data"] = self._text_arrays(
                text, "validation_data"
            )
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`; `x` may be raw text, as in `fit`."""
        x, y, kwargs = self._from_text(x, y, kwargs)
        return super().evaluate(x, y, *args, **kwargs)

    def _from_text(self, x, y, kwargs):
        if not hub.is_text(x):
            return x, y, kwargs
        weights = kwargs.get("sample_weight")
        if y is not None or weights is not None:
            raise ValueError(
                "With raw text in `x` the student's preprocessor makes the "
                "labels and the sample weights: pass neither `y` nor "
                f"`sample_weight`. Received: y={_short(y)}, "
                f"sample_weight={_short(weights)}"
            )
        x, y, weights = self._text_arrays(x, "x")
        return x, y, dict(kwargs, sample_weight=weights)

    def _text_arrays(self, text, name):
        preprocessor = getattr(self.student, "preprocessor", None)
        if preprocessor is None:
            raise ValueError(
                f"`{name}` holds raw text, but the student has no "
                "preprocessor to tokenize it: build it with one (e.g. "
                "`LlamaCausalLMPreprocessor`), or pass token arrays "
                f"`{{'token_ids', 'padding_mask'}}`. Received: {name}="
                f"{_short(text)}"
            )
        if self.teacher is None:
            raise ValueError(
                f"`{name}` holds raw text, but offline distillation reads "
                "the teacher's cached top-k arrays from `x` beside the "
                "token ids: preprocess the text, cache the teacher with "
                f"`cache_causal_lm_top_k` and pass both. Received: {name}="
                f"{_short(text)}"
            )
        return hub.preprocess(preprocessor, text)

    def call(self, inputs, training=None):
        """The student's final hidden states `[batch, length, hidden]`."""
        backbone = self.student.backbone
        return backbone(inputs_for(backbone, inputs), training=training)

    def teacher_predictions(self, x):
        """The teacher's final hidden states, gradient-free; without a
        teacher, the cached top-k arrays of the batch `x`."""
        if self.teacher is None:
            return top_k_cache.cached_teacher(x)
        return frozen_call(self.teacher.backbone, x)

    def compile(
        self,
        optimizer="rmsprop",
        loss=None,
        distillation_loss=None,
        alpha=0.1,
        metrics=None,
        **kwargs,
    ):
        """As `Distiller.compile`, with the next-token cross-entropy built
        in: `loss` must be `None` (it is then computed whenever labels are
        given), and `metrics` are not available (the model outputs hidden
        states; the `student_loss` is the mean next-token cross-entropy, so
        `exp(student_loss)` is the perplexity)."""
        if loss is not None:
            raise _checks.invalid(
                "loss",
                "None: the next-token cross-entropy is built in and fused "
                "with the distillation term",
                loss,
            )
        if metrics:
            raise _checks.invalid(
                "metrics",
                "None: the distiller's outputs are hidden states, not logits",
                metrics,
            )
        super().compile(
            optimizer,
            loss=None,
            distillation_loss=distillation_loss,
            alpha=alpha,
            **kwargs,
        )
        divergence = _divergence_of(self.distillation_loss)
        if self.teacher is None and divergence != "kl":
            raise _checks.invalid(
                "distillation_loss",
                "`keras_kd.losses.KLDivergence` without a teacher: a top-k "
                "cache gives the KL of the bucketed distributions exactly",
                self.distillation_loss,
            )

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if self.distillation_loss is None:
            raise ValueError(
                "The CausalLMDistiller must be compiled before training: "
                "call `distiller.compile(optimizer, distillation_loss, alpha)`."
            )
        if y is not None and is_placeholder(y):
            y = None
        terms = self._online_terms
        if self.teacher is None:
            terms = self._offline_terms
        total, student, distillation = terms(
            x, y, y_pred, self._token_mask(x, sample_weight)
        )
        regularization = self._regularization()
        if regularization is not None:
            total = total + ops.cast(regularization, total.dtype)
        rows = batch_size(x)
        if student is not None:
            self.student_loss_tracker.update_state(
                unscale_for_replicas(student), sample_weight=rows
            )
        self.distillation_loss_tracker.update_state(
            unscale_for_replicas(distillation), sample_weight=rows
        )
        return total

    def _online_terms(self, x, y, y_pred, mask):
        loss = self.distillation_loss
        kernel, layout, cap = hub.output_head(self.student, "student")
        teacher_kernel, teacher_layout, teacher_cap = hub.output_head(
            self.teacher, "teacher"
        )
        arguments = dict(
            mask=mask,
            divergence=_divergence_of(loss),
            beta=getattr(loss, "beta", 0.5),
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            student_kernel_layout=layout,
            teacher_kernel_layout=teacher_layout,
            student_logit_soft_cap=cap,
            teacher_logit_soft_cap=teacher_cap,
            # The distillation loss's own choice of path.
            precise=getattr(loss, "precise", None),
        )
        teacher_hidden = self.teacher_predictions(x)
        if y is None:
            total = kd_ops.fused_linear_divergence(
                y_pred, kernel, teacher_hidden, teacher_kernel, **arguments
            )
            return total, None, ops.stop_gradient(total)
        return kd_ops.fused_linear_distillation_loss(
            y_pred,
            kernel,
            teacher_hidden,
            teacher_kernel,
            y,
            alpha=self.alpha,
            return_components=True,
            **arguments,
        )

    def _offline_terms(self, x, y, y_pred, mask):
        kernel, layout, cap = hub.output_head(self.student, "student")
        *teacher, cached_temperature = self.teacher_predictions(x)
        arguments = dict(
            mask=mask,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            student_kernel_layout=layout,
            student_logit_soft_cap=cap,
            teacher_temperature=cached_temperature,
        )
        if y is None:
            total = kd_ops.fused_linear_top_k_divergence(
                y_pred, kernel, *teacher, **arguments
            )
            return total, None, ops.stop_gradient(total)
        return kd_ops.fused_linear_top_k_distillation_loss(
            y_pred,
            kernel,
            *teacher,
            y,
            alpha=self.alpha,
            return_components=True,
            **arguments,
        )

    def _loss_terms(self):
        # The built-in cross-entropy is tracked whenever labels come.
        return self._both_terms

    def _token_mask(self, x, sample_weight):
        if sample_weight is not None:
            return sample_weight
        if isinstance(x, dict) and "padding_mask" in x:
            return x["padding_mask"]
        return None

    def get_config(self):
        config = super().get_config()
        config["chunk_size"] = self.chunk_size
        return config


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
