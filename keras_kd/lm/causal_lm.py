"""`CausalLMDistiller`: distill a keras-hub causal language model from a
larger one, or from its cached top-k outputs, without building either
model's logits."""

import keras
import numpy as np
from keras import ops

from keras_kd import _checks
from keras_kd._keras_compat import LossTrackers
from keras_kd._model_utils import (
    batch_size,
    frozen_call,
    inputs_for,
    is_placeholder,
    unscale_for_replicas,
)
from keras_kd.api import export
from keras_kd.distillers.distiller import Distiller
from keras_kd.lm import _cross_tokenizer as cross
from keras_kd.lm import _keras_hub as hub
from keras_kd.lm import _loss_terms as loss_terms
from keras_kd.lm import top_k_cache
from keras_kd.lm._generation import (
    ResponsePlan,
    check_room,
    generated_batch,
)


@export
class CausalLMDistiller(Distiller):
    """Distills a keras-hub causal language model, logits never built.

    Student and teacher are keras-hub `CausalLM` models (GPT2, Llama,
    Gemma, Mistral, Qwen, ...) over the same vocabulary (the teacher's may
    be padded with extra ids, which are ignored), or over two vocabularies
    with `distillation_loss=UniversalLogitDistance()` or
    `HybridLogitDistance()`: the batches are then aligned token groups of
    both tokenizations (`keras_kd.align_tokens`; raw text is aligned by
    both models' preprocessors). Each step runs both
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
        seed: the seed of the generation draws (`None`: random).
        alignment: how raw text is aligned for a teacher with another
            tokenizer: `"bytes"` (groups of tokens covering the same
            bytes) or `"positional"` (ULD's pairing by position).
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

    def __init__(
        self,
        student,
        teacher=None,
        chunk_size=None,
        seed=None,
        alignment="bytes",
        **kwargs,
    ):
        hub.check_causal_lm("student", student)
        if teacher is not None:
            hub.check_causal_lm("teacher", teacher)
        super().__init__(student, teacher, **kwargs)
        if chunk_size is not None:
            chunk_size = _checks.integer("chunk_size", chunk_size, low=1)
        self.chunk_size = chunk_size
        if seed is not None:
            seed = _checks.integer("seed", seed, low=0)
        self.seed = seed
        self.alignment = _checks.choice(
            "alignment", alignment, cross.ALIGNMENTS
        )
        self._cross = None
        # Every generation draw comes from here; its state is saved with
        # the distiller's weights, so a reloaded run resumes its stream.
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.generated_length_tracker = keras.metrics.Mean(
            name="generated_length"
        )
        self._generated_term = LossTrackers(
            [self.generated_length_tracker], name="generated_length_term"
        )
        self._responses = None

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`; `x` may also be raw text, tokenized by the
        student's keras-hub preprocessor (then give no `y` nor
        `sample_weight`): a list or array of strings (every token after
        the first is trained on), or `{"prompts": [...], "responses":
        [...]}` (only the responses and their end token are weighted; the
        responses may be left out when every step generates them).
        `validation_data` may be raw text too."""
        x, y, kwargs = cross.text_arrays(self, x, y, kwargs, "x", fit=True)
        if self._generates():
            check_room(x, kwargs.get("sample_weight"))
        data = kwargs.get("validation_data")
        if hub.is_raw_text(data):
            data, y_val, rest = cross.text_arrays(
                self, data, None, {}, "validation_data"
            )
            kwargs["validation_data"] = (data, y_val, rest.get("sample_weight"))
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`; `x` may be raw text, as in `fit`."""
        x, y, kwargs = cross.text_arrays(self, x, y, kwargs, "x")
        return super().evaluate(x, y, *args, **kwargs)

    def call(self, inputs, training=None):
        """The student's final hidden states `[batch, length, hidden]`.

        When a training step may generate, the student runs in
        `compute_loss` on the completed batch (the prompts need the sample
        weights) and this returns an empty `[batch, length, 0]`."""
        if training and self._generates():
            shape = ops.shape(inputs["token_ids"])
            return ops.zeros((shape[0], shape[1], 0))
        backbone = self.student.backbone
        return backbone(inputs_for(backbone, inputs), training=training)

    def _generates(self, in_step=True):  # across tokenizers: per epoch
        plan, step = self._responses, in_step and self._cross is not None
        return plan is not None and plan.generates and not step

    def teacher_predictions(self, x):
        """The teacher's hidden states (no gradient), or the top-k cache."""
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
        on_policy_fraction=0.0,
        sequence_kd=False,
        sampler="random",
        max_new_tokens=None,
        stop_token_ids="auto",
        **kwargs,
    ):
        """As `Distiller.compile`, with the next-token cross-entropy built
        in: `loss` must be `None` (it is then computed whenever labels are
        given), and `metrics` are not available (the model outputs hidden
        states; the `student_loss` is the mean next-token cross-entropy, so
        `exp(student_loss)` is the perplexity).

        Responses generated in the training step (on-policy and
        sequence-level distillation): each step one seeded draw lets the
        student generate the batch's responses with probability
        `on_policy_fraction`; otherwise the teacher generates them if
        `sequence_kd`, else the dataset's are used. A row's prompt is its
        real tokens up to its first positively weighted label (all of them
        when none is). Generated responses are trained on up to and
        including the first stop token; the cross-entropy (`alpha`) never
        applies to the student's own samples. `evaluate` never generates.

        Args:
            on_policy_fraction: probability in `[0, 1]` that a step trains
                on the student's own generations.
            sequence_kd: whether the teacher generates the responses of the
                other steps (instead of the dataset).
            sampler: a keras-hub sampler name (`"greedy"`, `"random"`,
                `"top_k"`, `"top_p"`) or a `keras_hub.samplers.Sampler`.
                Its temperature is the sampling temperature; the
                distillation loss's `temperature` is the loss's only.
            max_new_tokens: most tokens generated per row (`None`: up to
                the sequence length).
            stop_token_ids: `"auto"` (the student tokenizer's end token),
                `None` (no stop token) or a list of ids.
        """
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
        responses = ResponsePlan(
            self,
            on_policy_fraction=on_policy_fraction,
            sequence_kd=sequence_kd,
            sampler=sampler,
            max_new_tokens=max_new_tokens,
            stop_token_ids=stop_token_ids,
        )
        super().compile(
            optimizer,
            loss=None,
            distillation_loss=distillation_loss,
            alpha=alpha,
            **kwargs,
        )
        self._responses = responses
        self._cross = cross.plan(self, self.distillation_loss, responses)
        if self._cross is not None:
            return
        divergence = loss_terms.divergence_of(self.distillation_loss)
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
        rows = batch_size(x)
        alpha, scale = self.alpha, None
        if training and self._generates():
            x, y, sample_weight, lengths, cross_entropy_weight = (
                self._responses.training_batch(self, x, y, sample_weight)
            )
            backbone = self.student.backbone
            y_pred = backbone(inputs_for(backbone, x), training=True)
            # On the student's own samples the cross-entropy is dropped
            # and the divergence keeps its weight: (1 - alpha) * D.
            alpha = alpha * cross_entropy_weight
            scale = 1.0 - (1.0 - cross_entropy_weight) * self.alpha
            self.generated_length_tracker.update_state(
                ops.mean(lengths), sample_weight=rows
            )
        if cross.is_aligned(x) or self._cross is not None:
            total, student, distillation = cross.terms(
                self, x, y, y_pred, sample_weight, alpha
            )
        else:
            terms = loss_terms.online
            if self.teacher is None:
                terms = loss_terms.offline
            mask = self._token_mask(x, sample_weight)
            total, student, distillation = terms(
                self, x, y, y_pred, mask, alpha
            )
        if scale is not None:
            total = total * ops.cast(scale, total.dtype)
        regularization = self._regularization()
        if regularization is not None:
            total = total + ops.cast(regularization, total.dtype)
        if student is not None:
            self.student_loss_tracker.update_state(
                unscale_for_replicas(student), sample_weight=rows
            )
        self.distillation_loss_tracker.update_state(
            unscale_for_replicas(distillation), sample_weight=rows
        )
        return total

    def _loss_terms(self):
        # The built-in cross-entropy is tracked whenever labels come.
        return self._both_terms

    @property
    def metrics(self):
        metrics = super().metrics
        if self._generates(in_step=False):
            return metrics
        own = (self._generated_term, self.generated_length_tracker)
        return [m for m in metrics if all(m is not o for o in own)]

    def _extra_terms(self):
        return [self._generated_term] if self._generates(False) else []

    def generate_responses(self, x, source="student", sample_weight=None):
        """The batch a training step would train on, with the responses
        generated by `source` (`"student"` or `"teacher"`).

        The same computation as the compiled step, with the sampler,
        `max_new_tokens` and `stop_token_ids` given to `compile`, and the
        next seed of the distiller's stream (this advances it).

        Args:
            x: a batch `{"token_ids", "padding_mask"}`, or raw prompts (a
                list of strings, tokenized by the student's preprocessor).
            source: `"student"` or `"teacher"`.
            sample_weight: the batch's label weights; each row's prompt
                ends at its first positive weight (`None`: the prompt is
                every real token).

        Returns:
            `(x, y, sample_weight)` NumPy arrays of the completed batch:
            token ids and padding mask, next-token labels, and weight 1 on
            each generated label.
        """
        x, y, weights = generated_batch(self, x, source, sample_weight)
        x = {k: ops.convert_to_numpy(v) for k, v in x.items()}
        return x, ops.convert_to_numpy(y), ops.convert_to_numpy(weights)

    def _token_mask(self, x, sample_weight):
        if sample_weight is None and isinstance(x, dict):
            return x.get("padding_mask")
        return sample_weight

    def get_config(self):
        config = super().get_config()
        config["chunk_size"] = self.chunk_size
        config["seed"] = self.seed
        config["alignment"] = self.alignment
        return config

    def get_compile_config(self):
        config = super().get_compile_config()
        if config and self._responses is not None:
            config.update(self._responses.get_config())
        return config

    # The seed generator's state is saved beside `alpha` and `temperature`
    # (Keras saves a layer's weights, not its seed generators).
    def save_own_variables(self, store):
        super().save_own_variables(store)
        store[_SEED_KEY] = self.seed_generator.state

    def load_own_variables(self, store):
        keys = [k for k in store.keys() if k != _SEED_KEY]
        super().load_own_variables({k: store[k] for k in keys})
        if _SEED_KEY in store.keys():
            self.seed_generator.state.assign(np.asarray(store[_SEED_KEY]))


_SEED_KEY = "seed_generator_state"
