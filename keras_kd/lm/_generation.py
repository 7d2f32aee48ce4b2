"""Responses generated inside the training step: on-policy distillation
(the student writes them), sequence-level distillation (the teacher
does), and the mixture of these with the dataset's own responses.

`ResponsePlan` holds what `CausalLMDistiller.compile` was told and turns a
batch `(x, y, sample_weight)` into the batch that is trained on. Everything
here is written in `keras.ops` so that generation is part of the compiled
step: keras-hub's `generate_step` (a `while_loop` over the KV cache) runs
with the sampler given at `compile`, on weights read from the step's
current values.

Why a nested `keras.StatelessScope` around generation: it gives the
models' weights to the decoding loop behind `stop_gradient` (no tangent
or autograd graph through sampling), and it lends the sampler a seed drawn
from the distiller's own seed generator without touching the sampler's
own state, so one saved variable decides every draw. Updates made inside
stay inside, which also keeps them from leaking out of a `cond` branch on
JAX.
"""

import keras
import numpy as np
from keras import ops

from keras_kd import _checks
from keras_kd._model_utils import no_grad
from keras_kd.lm import _keras_hub as hub

SAMPLER_NAMES = ("greedy", "random", "top_k", "top_p")
SOURCES = ("student", "teacher")


def sampler_from(value):
    """A keras-hub `Sampler` from one of `SAMPLER_NAMES` or an instance."""
    import keras_hub

    if isinstance(value, dict):  # from a saved compile config
        value = keras_hub.samplers.deserialize(value)
    # keras-hub's `samplers.get` returns an unknown name unchanged.
    if isinstance(value, str) and value in SAMPLER_NAMES:
        return keras_hub.samplers.get(value)
    if not isinstance(value, keras_hub.samplers.Sampler):
        raise _checks.invalid(
            "sampler",
            f"one of {SAMPLER_NAMES} or a `keras_hub.samplers.Sampler`",
            value,
        )
    return value


def stop_tokens(student, value):
    """The stop token ids as a tuple, or `None` (generate to the end)."""
    if value is None:
        return None
    if isinstance(value, str) and value == "auto":
        tokenizer = getattr(
            getattr(student, "preprocessor", None), "tokenizer", None
        )
        ids = [getattr(tokenizer, "end_token_id", None)]
        # Llama 3 ends a turn with a second end token, as keras-hub knows.
        ids.append(getattr(tokenizer, "end_token2_id", None))
        ids = tuple(int(i) for i in ids if i is not None)
        if not ids:
            raise _checks.invalid(
                "stop_token_ids",
                '`None`, a list of token ids, or "auto" with a student '
                "whose preprocessor's tokenizer has an `end_token_id`",
                value,
            )
        return ids
    items = value if isinstance(value, (list, tuple)) else [value]
    try:
        return tuple(_checks.integer("stop_token_ids", i, low=0) for i in items)
    except ValueError:
        raise _checks.invalid(
            "stop_token_ids",
            '`None`, "auto" or a list of non-negative token ids',
            value,
        ) from None


def prompt_mask(padding_mask, sample_weight):
    """Each row's prompt: its real tokens up to the first position whose
    label has a positive weight (`sample_weight[i]` weighs the label
    `token_ids[i + 1]`, so the prompt is `token_ids[: i + 1]`); all its
    real tokens when no weight is positive."""
    real = ops.cast(padding_mask, "bool")
    if sample_weight is None:
        return real
    length = ops.shape(real)[1]
    weighted = ops.cast(sample_weight, "float32") > 0.0
    first = ops.argmax(ops.cast(weighted, "int32"), axis=1)
    first = ops.where(ops.any(weighted, axis=1), first, length)
    positions = ops.arange(length, dtype="int32")[None, :]
    return ops.logical_and(real, positions <= ops.cast(first, "int32")[:, None])


def check_room(x, sample_weight):
    """A `ValueError` unless every row of the host batch `x` has a prompt
    and room after it for a generated token."""
    if not isinstance(x, dict) or "padding_mask" not in x:
        return
    try:
        mask = np.asarray(x["padding_mask"]).astype(bool)
        weights = None if sample_weight is None else np.asarray(sample_weight)
    except (TypeError, ValueError):
        return  # not host arrays: checked by nothing but the results
    prompt = ops.convert_to_numpy(prompt_mask(mask, weights)).sum(axis=1)
    length = mask.shape[1]
    full = np.flatnonzero(prompt >= length)
    empty = np.flatnonzero(prompt == 0)
    if full.size or empty.size:
        rows = full if full.size else empty
        what = (
            f"fill all {length} positions, which leaves no room for a "
            "generated response"
            if full.size
            else "are empty (no real token to start from)"
        )
        raise ValueError(
            f"On-policy or sequence-level distillation generates after "
            f"each row's prompt, but the prompts of {rows.size} row(s) of "
            f"`x` (rows {rows[:5].tolist()}...) {what}: shorten the prompts "
            "or lengthen the sequences. Received: x with padding_mask sums "
            f"{mask.sum(axis=1)[rows[:5]].tolist()}"
        )


class _VocabularyBound:
    """A sampler that only draws ids below `size`: a teacher's padded
    vocabulary ids have no student logit and are never sampled."""

    def __init__(self, sampler, size):
        self.sampler, self.size = sampler, size

    def __call__(self, next, **kwargs):
        def bounded(prompt, cache, index):
            logits, hidden, cache = next(prompt, cache, index)
            return logits[:, : self.size], hidden, cache

        return self.sampler(next=bounded, **kwargs)


def complete(
    model,
    inputs,
    prompt,
    sampler,
    seed,
    stop_token_ids,
    max_new_tokens,
    vocabulary_size,
    pad_token_id,
):
    """Fills each row of `inputs` after its `prompt` with `model`'s
    generation. Returns `(inputs, labels, sample_weight, lengths)` of the
    completed batch: the new tokens (and the mask of prompt plus response),
    the next-token labels, weight 1 on every label that is a generated
    token (the stop token included, nothing after it, nothing past
    `max_new_tokens`), and the number of generated tokens per row."""
    token_ids = ops.convert_to_tensor(inputs["token_ids"])
    length = ops.shape(token_ids)[1]
    frozen = [(v, ops.stop_gradient(v.value)) for v in model.variables]
    seeds = [
        (state, ops.cast(seed, state.dtype) + ops.cast([i, 0], state.dtype))
        for i, state in enumerate(sampler.variables)
    ]
    if ops.shape(model.backbone.token_embedding.embeddings)[0] > (
        vocabulary_size
    ):
        sampler = _VocabularyBound(sampler, vocabulary_size)
    previous = model.sampler
    with no_grad(), keras.StatelessScope(state_mapping=frozen + seeds):
        # `generate_step` samples with `model.sampler`.
        model.sampler = sampler
        try:
            out = model.generate_step(
                {"token_ids": token_ids, "padding_mask": prompt},
                stop_token_ids=stop_token_ids,
            )
        finally:
            model.sampler = previous
    generated = ops.logical_and(
        ops.cast(out["padding_mask"], "bool"), ops.logical_not(prompt)
    )
    if max_new_tokens is not None:
        starts = ops.sum(ops.cast(prompt, "int32"), axis=1)
        positions = ops.arange(length, dtype="int32")[None, :]
        budget = positions < (starts + max_new_tokens)[:, None]
        generated = ops.logical_and(generated, budget)
    real = ops.logical_or(prompt, generated)
    tokens = ops.stop_gradient(out["token_ids"])
    tokens = ops.where(real, tokens, ops.cast(pad_token_id, tokens.dtype))
    tokens = ops.cast(tokens, token_ids.dtype)
    pad = ops.full_like(tokens[:, :1], pad_token_id)
    labels = ops.concatenate([tokens[:, 1:], pad], axis=1)
    weights = ops.cast(generated, "float32")
    weights = ops.concatenate(
        [weights[:, 1:], ops.zeros_like(weights[:, :1])], axis=1
    )
    mask_dtype = ops.convert_to_tensor(inputs["padding_mask"]).dtype
    completed = dict(
        inputs, token_ids=tokens, padding_mask=ops.cast(real, mask_dtype)
    )
    lengths = ops.sum(ops.cast(generated, "float32"), axis=1)
    return completed, labels, weights, lengths


class ResponsePlan:
    """Where each training step's responses come from.

    Per step one uniform draw from the distiller's seed generator: below
    `on_policy_fraction` the student generates the responses; otherwise
    the teacher does with `sequence_kd`, else the dataset's are used.
    """

    def __init__(
        self,
        distiller,
        on_policy_fraction=0.0,
        sequence_kd=False,
        sampler="random",
        max_new_tokens=None,
        stop_token_ids="auto",
    ):
        self.on_policy_fraction = _checks.fraction(
            "on_policy_fraction", on_policy_fraction
        )
        if not isinstance(sequence_kd, bool):
            raise _checks.invalid(
                "sequence_kd", "`True` or `False`", sequence_kd
            )
        if sequence_kd and self.on_policy_fraction == 1.0:
            raise _checks.invalid(
                "sequence_kd",
                "`False` with `on_policy_fraction=1` (the student then "
                "generates every response and the teacher's would never be "
                "used)",
                sequence_kd,
            )
        self.sequence_kd = sequence_kd
        if max_new_tokens is not None:
            max_new_tokens = _checks.integer(
                "max_new_tokens", max_new_tokens, low=1
            )
        self.max_new_tokens = max_new_tokens
        self.sampler_argument = sampler
        self.sampler = sampler_from(sampler)
        self.stop_token_argument = stop_token_ids
        self.stop_token_ids = None
        if self.generates:
            if distiller.teacher is None:
                name = "sequence_kd" if sequence_kd else "on_policy_fraction"
                raise _checks.invalid(
                    name,
                    "no generation without a teacher model: an offline "
                    "top-k cache only scores the dataset's responses "
                    "(build the distiller with a teacher)",
                    sequence_kd if sequence_kd else self.on_policy_fraction,
                )
        # Resolved even without generation, so that `generate_responses`
        # works after any `compile`; "auto" needs the student's tokenizer
        # only when something is generated.
        try:
            self.stop_token_ids = stop_tokens(distiller.student, stop_token_ids)
        except ValueError:
            if self.generates or stop_token_ids != "auto":
                raise
        embedding = distiller.student.backbone.token_embedding
        self.vocabulary_size = int(embedding.input_dim)
        preprocessor = getattr(distiller.student, "preprocessor", None)
        tokenizer = getattr(preprocessor, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)

    @property
    def generates(self):
        return self.on_policy_fraction > 0.0 or self.sequence_kd

    @property
    def uses_dataset(self):
        return self.on_policy_fraction < 1.0 and not self.sequence_kd

    def get_config(self):
        sampler = self.sampler_argument
        if not isinstance(sampler, str):
            import keras_hub

            # The resolved sampler: the argument may itself be a config.
            sampler = keras_hub.samplers.serialize(self.sampler)
        return {
            "on_policy_fraction": self.on_policy_fraction,
            "sequence_kd": self.sequence_kd,
            "sampler": sampler,
            "max_new_tokens": self.max_new_tokens,
            "stop_token_ids": self.stop_token_argument,
        }

    def responses(self, distiller, source, x, sample_weight, seed):
        """`complete` with the student (`source="student"`) or the teacher
        generating after each row's prompt."""
        model = distiller.student if source == "student" else distiller.teacher
        prompt = prompt_mask(x["padding_mask"], sample_weight)
        return complete(
            model,
            x,
            prompt,
            self.sampler,
            seed,
            self.stop_token_ids,
            self.max_new_tokens,
            self.vocabulary_size,
            self.pad_token_id,
        )

    def training_batch(self, distiller, x, y, sample_weight):
        """`(x, y, sample_weight, lengths, cross_entropy_weight)` of the
        batch trained on this step. The cross-entropy weight is 0 on the
        student's own samples and 1 otherwise; `lengths` counts the
        generated tokens per row (0 on the dataset's responses)."""
        if y is None and self.uses_dataset:
            raise _checks.invalid(
                "on_policy_fraction",
                "1, or `sequence_kd=True`, for a batch without responses "
                "(no labels `y`): the dataset's responses are used on "
                f"{1 - self.on_policy_fraction:.0%} of the steps",
                self.on_policy_fraction,
            )
        generator = distiller.seed_generator
        draw = keras.random.uniform((), seed=generator)
        seed = generator.next()

        def generated(source, cross_entropy_weight):
            def branch():
                batch = self.responses(
                    distiller, source, x, sample_weight, seed
                )
                return (
                    *_essentials(*batch[:3]),
                    batch[3],
                    cross_entropy_weight,
                )

            return branch

        def dataset():
            weights = sample_weight
            if weights is None:
                weights = x["padding_mask"]
            tokens = ops.convert_to_tensor(x["token_ids"])
            zeros = ops.zeros((ops.shape(tokens)[0],), "float32")
            labels = ops.cast(y, tokens.dtype)
            return (*_essentials(x, labels, weights), zeros, ops.ones(()))

        student = generated("student", ops.zeros(()))
        other = (
            generated("teacher", ops.ones(())) if self.sequence_kd else dataset
        )
        if self.on_policy_fraction == 1.0:
            out = student()
        elif self.on_policy_fraction == 0.0:
            out = other()
        else:
            out = ops.cond(draw < self.on_policy_fraction, student, other)
        tokens, mask, labels, weights, lengths, cross_entropy_weight = out
        batch = dict(x, token_ids=tokens, padding_mask=mask)
        return batch, labels, weights, lengths, cross_entropy_weight


def _essentials(x, labels, weights):
    tokens = ops.convert_to_tensor(x["token_ids"])
    mask = ops.convert_to_tensor(x["padding_mask"])
    return tokens, mask, labels, ops.cast(weights, "float32")


def generated_batch(distiller, x, source, sample_weight):
    """`CausalLMDistiller.generate_responses` up to the NumPy conversion
    of `x`: its checks, then one generation with the next seed."""
    if source not in SOURCES:
        raise _checks.invalid("source", f"one of {SOURCES}", source)
    if distiller._responses is None:
        raise ValueError(
            "Call `distiller.compile(...)` before `generate_responses`: "
            "the sampler and the stop tokens are compile arguments."
        )
    if source == "teacher" and distiller.teacher is None:
        raise _checks.invalid(
            "source", '"student" for a distiller without a teacher', source
        )
    if hub.is_text(x):
        x = hub.prompts(distiller.student.preprocessor, x)
    x = {k: ops.convert_to_tensor(v) for k, v in x.items()}
    if sample_weight is not None:
        sample_weight = ops.convert_to_tensor(sample_weight)
    seed = distiller.seed_generator.next()
    x, y, weights, _ = distiller._responses.responses(
        distiller, source, x, sample_weight, seed
    )
    return x, y, weights
