"""Everything keras-kd knows about keras-hub models: which models it takes,
where their output head is, and how raw text becomes training arrays.

Raw text for `CausalLMDistiller.fit` and `evaluate` (strings, or
`{"prompts", "responses"}` pairs): keras-hub's own
`CausalLM.fit` maps its preprocessor over a `tf.data` pipeline, which
needs `tensorflow-text` on every backend. Here the student's preprocessor
runs eagerly, once, over blocks of the strings (keras-hub tokenizes
eagerly without `tensorflow-text`), and training gets the arrays it makes:
`{"token_ids", "padding_mask"}`, the next tokens and the padding mask as
`sample_weight`. A corpus that does not fit in memory as token ids belongs
in a `tf.data` pipeline the user maps the preprocessor over.
"""

import keras
import numpy as np
from keras import ops

from keras_kd import _checks


def check_causal_lm(name, model):
    """`model` if it is a keras-hub `CausalLM` whose logits keras-kd can
    compute from its hidden states, else a `ValueError` naming `name`.

    Refused rather than computed wrongly: a model whose own `call`
    replaces its graph (Gemma 4's MTP assistant), whose logits come from
    another layer than a reversible `token_embedding` (RWKV-7), whose
    backbone does not output its final hidden states (encoder-decoder
    `Seq2SeqLM`s), whose graph applies anything else between them and the
    logits (a slice that drops PaliGemma's or BLIP-2's image positions, a
    scale), and the heads `output_head` refuses."""
    _checks.model(name, model)
    backbone = getattr(model, "backbone", None)
    head = getattr(backbone, "token_embedding", None)
    if head is None or not hasattr(head, "embeddings"):
        raise _checks.invalid(
            name,
            "a keras-hub `CausalLM` (a model with `backbone.token_embedding`, "
            "e.g. `keras_hub.models.LlamaCausalLM`)",
            model,
        )
    _check_logits_graph(model, name)
    output_head(model, name)
    return model


def output_head(model, name="model"):
    """`(kernel, layout, soft_cap)` of a keras-hub CausalLM's output head.

    The head is the backbone's `token_embedding` used in reverse: a tied
    embedding `[vocab, hidden]` (layout `"vh"`, used through its transpose
    without a copy) or an untied reverse kernel `[hidden, vocab]`
    (`"hv"`), and the tanh soft cap on the logits, if any: the
    embedding's `logit_soft_cap` (Gemma 2 and 3) or the task's
    `final_logit_cap` (Gemma 4). The kernel keeps its dtype: the fused
    kernels cast it to a `bfloat16` or `float16` model's compute dtype.

    The model is one `check_causal_lm` accepted (its graph is the
    backbone and this head; a graph cannot change later). A head that can
    change later and then no longer be `soft_cap(hidden @ kernel)` is
    refused here, on every call, with a `ValueError` naming `name`: a
    quantized head (`model.quantize(...)`) and a head capped twice.
    """
    head = model.backbone.token_embedding
    mode = getattr(head, "quantization_mode", None)
    if mode is not None:
        raise _checks.invalid(
            name,
            "a CausalLM whose output head is not quantized (the fused "
            "kernels compute the logits from a float kernel; quantize the "
            f"student after distillation), not one quantized to {mode!r}",
            model,
        )
    caps = [
        getattr(head, "logit_soft_cap", None),
        getattr(model, "final_logit_cap", None),
    ]
    caps = [cap for cap in caps if cap is not None]
    if len(caps) > 1:
        raise _checks.invalid(
            name,
            "a CausalLM with at most one soft cap on its logits, not two "
            f"(its embedding's logit_soft_cap={caps[0]} and its "
            f"final_logit_cap={caps[1]})",
            model,
        )
    cap = caps[0] if caps else None
    if head.tie_weights:
        return head.embeddings, "vh", cap
    return head.reverse_embeddings, "hv", cap


# The operations of Gemma 4's `final_logit_cap` in its CausalLM's graph,
# after the head: `cap * tanh(logits / cap)`. Matched by name (another
# Keras naming them otherwise refuses the cap rather than misreads it).
_TASK_CAP = ["TrueDivide", "Tanh", "Multiply"]


def _check_logits_graph(model, name):
    """Raises unless `model(x)` is `token_embedding(backbone(x),
    reverse=True)`, then Gemma 4's task-level cap if it has one: what the
    distiller computes from the backbone's output."""
    # A CausalLM class (one with `generate`) defining `call` replaces the
    # functional graph checked below with its own computation.
    owner = next(c for c in type(model).__mro__ if "call" in vars(c))
    if hasattr(owner, "generate"):
        raise _checks.invalid(
            name,
            "a CausalLM whose logits are its functional graph, not one "
            f"whose class {owner.__name__} replaces `call` (its logits, if "
            "any, are not its backbone's output through its head)",
            model,
        )
    head = model.backbone.token_embedding
    if not hasattr(head, "tie_weights"):
        raise _checks.invalid(
            name,
            "a CausalLM whose logits come from `backbone.token_embedding` "
            "used in reverse (a `ReversibleEmbedding`), not one whose "
            f"token_embedding, a `{type(head).__name__}`, cannot project "
            "back (its logits come from another layer)",
            model,
        )
    output = model.backbone.output
    shape = getattr(output, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] != head.output_dim:
        found = (
            f"a {type(output).__name__} of {sorted(output)}"
            if isinstance(output, dict)
            else f"{shape}"
        )
        raise _checks.invalid(
            name,
            "a decoder-only CausalLM whose backbone outputs its final "
            f"hidden states [batch, length, {head.output_dim}], not one "
            f"whose backbone outputs {found}",
            model,
        )
    steps = [
        op
        for op in model.operations
        if not isinstance(op, keras.layers.InputLayer)
    ]
    task_cap = getattr(model, "final_logit_cap", None) is not None
    names = [type(op).__name__ for op in steps]
    if (
        len(steps) < 2
        or steps[0] is not model.backbone
        or steps[1] is not head
        or names[2:] != (_TASK_CAP if task_cap else [])
    ):
        capped = ", then its final_logit_cap" if task_cap else ""
        raise _checks.invalid(
            name,
            "a CausalLM whose logits are its backbone's output through "
            f"`backbone.token_embedding` in reverse{capped} and nothing "
            f"else, not one whose graph is {' -> '.join(names)} (a step "
            "the fused kernels do not take, e.g. a slice dropping image "
            "positions, or a scale)",
            model,
        )


# Strings per preprocessor call: bounds the eager call's temporaries.
_BLOCK = 1024


def is_text(x):
    """Whether `x` is raw text: a string, or a list, tuple or NumPy array
    of strings."""
    if isinstance(x, (str, bytes)):
        return True
    if isinstance(x, np.ndarray):
        return x.dtype.kind in "USO" and x.size > 0 and _is_string(x.flat[0])
    if isinstance(x, (list, tuple)):
        return len(x) > 0 and all(_is_string(item) for item in x)
    return False


def _is_string(item):
    return isinstance(item, (str, bytes, np.str_, np.bytes_))


def preprocess(preprocessor, texts):
    """`(x, y, sample_weight)` NumPy arrays from the student's keras-hub
    `CausalLMPreprocessor` over `texts`."""
    texts = strings(texts)
    parts = []
    for start in range(0, len(texts), _BLOCK):
        x, y, weights = preprocessor(texts[start : start + _BLOCK])
        parts.append(
            (
                {k: ops.convert_to_numpy(v) for k, v in x.items()},
                ops.convert_to_numpy(y),
                ops.convert_to_numpy(weights).astype("float32"),
            )
        )
    x = {k: np.concatenate([p[0][k] for p in parts]) for k in parts[0][0]}
    y = np.concatenate([p[1] for p in parts])
    weights = np.concatenate([p[2] for p in parts])
    return x, y, weights


def is_text_pairs(x):
    """Whether `x` is `{"prompts": text}` or `{"prompts", "responses"}`."""
    return (
        isinstance(x, dict)
        and "prompts" in x
        and set(x) <= {"prompts", "responses"}
        and all(is_text(v) for v in x.values())
    )


def is_raw_text(x):
    return is_text(x) or is_text_pairs(x)


def text_arrays(distiller, x, y, fit_kwargs, name):
    """`(x, y, fit_kwargs)` with raw text `x` tokenized by the student's
    preprocessor (its labels and weights in `y` and `sample_weight`);
    anything else unchanged."""
    if not is_raw_text(x):
        return x, y, fit_kwargs
    check_no_labels(y, fit_kwargs, name)
    preprocessor = getattr(distiller.student, "preprocessor", None)
    if preprocessor is None:
        raise ValueError(
            f"`{name}` holds raw text, but the student has no "
            "preprocessor to tokenize it: build it with one (e.g. "
            "`LlamaCausalLMPreprocessor`), or pass token arrays "
            f"`{{'token_ids', 'padding_mask'}}`. Received: {name}="
            f"{_short(x)}"
        )
    if distiller.teacher is None:
        raise ValueError(
            f"`{name}` holds raw text, but offline distillation reads "
            "the teacher's cached top-k arrays from `x` beside the "
            "token ids: preprocess the text, cache the teacher with "
            f"`cache_causal_lm_top_k` and pass both. Received: {name}="
            f"{_short(x)}"
        )
    if is_text(x):
        x, y, weights = preprocess(preprocessor, x)
    else:
        x, y, weights = preprocess_pairs(
            preprocessor, x["prompts"], x.get("responses"), name
        )
    return x, y, dict(fit_kwargs, sample_weight=weights)


def check_no_labels(y, fit_kwargs, name):
    """A `ValueError` when labels or weights come with raw text."""
    weights = fit_kwargs.get("sample_weight")
    if y is not None or weights is not None:
        raise ValueError(
            f"With raw text in `{name}` the preprocessors make the labels "
            "and the sample weights: pass neither `y` nor "
            f"`sample_weight`. Received: y={_short(y)}, "
            f"sample_weight={_short(weights)}"
        )


def prompts(preprocessor, texts):
    """`{"token_ids", "padding_mask"}` of prompts only (no labels)."""
    if preprocessor is None:
        raise ValueError(
            "Raw prompts need a student with a preprocessor to tokenize "
            "them; pass `{'token_ids', 'padding_mask'}` arrays instead. "
            f"Received: x={_short(texts)}"
        )
    return preprocess_pairs(preprocessor, texts, None, "x")[0]


def preprocess_pairs(preprocessor, prompts, responses, name):
    """`(x, y, sample_weight)` NumPy arrays for prompt and response pairs.

    Each row is the start token, the prompt's tokens, the response's and
    the end token (the start and end tokens as the preprocessor adds
    them), cut to the preprocessor's `sequence_length + 1` tokens; only
    labels that are response tokens or the end token are weighted. Without
    responses the rows are prompts alone, with no end token (as keras-hub
    prepares prompts for `generate`), and `y` is `None`.
    """
    prompts = strings(prompts)
    if responses is not None:
        responses = strings(responses)
        if len(responses) != len(prompts):
            raise ValueError(
                f"`{name}` needs one response per prompt. Received: "
                f"{len(prompts)} prompts and {len(responses)} responses"
            )
    tokenizer = preprocessor.tokenizer
    length = int(preprocessor.sequence_length)
    start = [tokenizer.start_token_id] if preprocessor.add_start_token else []
    end = [tokenizer.end_token_id] if preprocessor.add_end_token else []
    pad = tokenizer.pad_token_id or 0
    tokens = np.full((len(prompts), length + 1), pad, "int32")
    real = np.zeros((len(prompts), length + 1), bool)
    trained = np.zeros((len(prompts), length + 1), bool)
    prompt_ids = _token_lists(tokenizer, prompts)
    answer_ids = (
        _token_lists(tokenizer, responses) if responses is not None else None
    )
    for i, ids in enumerate(prompt_ids):
        head = start + ids
        tail = answer_ids[i] + end if answer_ids is not None else []
        row = (head + tail)[: length + 1]
        tokens[i, : len(row)] = row
        real[i, : len(row)] = True
        trained[i, len(head) : len(row)] = True
    x = {"token_ids": tokens[:, :-1], "padding_mask": real[:, :-1]}
    if responses is None:
        return x, None, np.zeros((len(prompts), length), "float32")
    return x, tokens[:, 1:], trained[:, 1:].astype("float32")


def strings(texts):
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    return [
        t.decode("utf-8") if isinstance(t, bytes) else str(t)
        for t in np.asarray(texts, dtype=object).ravel()
    ]


def _token_lists(tokenizer, texts):
    out = []
    for start in range(0, len(texts), _BLOCK):
        ids = tokenizer(texts[start : start + _BLOCK])
        if hasattr(ids, "to_list"):  # a tf.RaggedTensor
            ids = ids.to_list()
        out.extend([int(i) for i in row] for row in ids)
    return out


def _short(value, limit=80):
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
