"""Everything keras-kd knows about keras-hub models: which models it takes,
where their output head is, and how raw text becomes training arrays.

Raw text for `CausalLMDistiller.fit` and `evaluate`: keras-hub's own
`CausalLM.fit` maps its preprocessor over a `tf.data` pipeline, which
needs `tensorflow-text` on every backend. Here the student's preprocessor
runs eagerly, once, over blocks of the strings (keras-hub tokenizes
eagerly without `tensorflow-text`), and training gets the arrays it makes:
`{"token_ids", "padding_mask"}`, the next tokens and the padding mask as
`sample_weight`. A corpus that does not fit in memory as token ids belongs
in a `tf.data` pipeline the user maps the preprocessor over.
"""

import numpy as np
from keras import ops

from keras_kd import _checks


def check_causal_lm(name, model):
    """`model` if it is a keras-hub `CausalLM` whose logits keras-kd can
    compute from its hidden states, else a `ValueError` naming `name`."""
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
    output_head(model, name)
    return model


def output_head(model, name="model"):
    """`(kernel, layout, soft_cap)` of a keras-hub CausalLM's output head.

    The head is the backbone's `token_embedding` used in reverse: a tied
    embedding `[vocab, hidden]` (layout `"vh"`, used through its transpose
    without a copy) or an untied reverse kernel `[hidden, vocab]`
    (`"hv"`), and the tanh soft cap on the logits, if any: the
    embedding's `logit_soft_cap` (Gemma 2 and 3) or the task's
    `final_logit_cap` (Gemma 4).

    A head whose logits are not `soft_cap(hidden @ kernel)` is refused
    with a `ValueError` naming `name` rather than computed wrongly: a
    quantized head (its kernel holds integers, and its inputs are
    quantized too) and a head capped twice.
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
    if getattr(head, "tie_weights", True):
        return head.embeddings, "vh", cap
    return head.reverse_embeddings, "hv", cap


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
    if isinstance(texts, (str, bytes)):
        texts = [texts]
    texts = [
        t.decode("utf-8") if isinstance(t, bytes) else str(t)
        for t in np.asarray(texts, dtype=object).ravel()
    ]
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
