"""Offline distillation of language models: a teacher's top-k
log-probabilities per token, computed once and stored on disk.

Format (one directory, one `.npy` file per array, memory-mapped):

| file | shape | dtype | bytes |
| --- | --- | --- | --- |
| `teacher_top_k_log_probs.npy` | `[rows, length, k]` | float16 | 2k / token |
| `teacher_top_k_ids.npy` | `[rows, length, k]` | int32 | 4k / token |
| `teacher_tail_log_prob.npy` | `[rows, length]` | float32 | 4 / token |
| `teacher_temperature.npy` | `[rows]` | float32 | 4 / sequence |
| `causal_lm_top_k.json` | metadata, written last | | |

`6k + 4` bytes per token (388 at k = 64; float16 logits of a 128,256
vocabulary take 256,512). The tail is kept in float32: it is the log of a
small remainder, and its error is not relative to the top values'.
"""

import json
import os

import keras
import numpy as np
from keras import ops

from keras_kd import _checks
from keras_kd import ops as kd_ops
from keras_kd._model_utils import inputs_for
from keras_kd.distillers.teacher_cache import allocate
from keras_kd.lm._keras_hub import check_causal_lm, output_head

LOG_PROBS = "teacher_top_k_log_probs"
IDS = "teacher_top_k_ids"
TAIL = "teacher_tail_log_prob"
TEMPERATURE = "teacher_temperature"
KEYS = (LOG_PROBS, IDS, TAIL, TEMPERATURE)
METADATA = "causal_lm_top_k.json"
_FORMAT = "keras_kd.causal_lm_top_k"
_VERSION = 1


class _TopKHead(keras.layers.Layer):
    """The teacher's output head reduced to `(log_probs, ids, tail)` per
    token (`keras_kd.ops.fused_linear_top_k`), as a layer of the model
    `predict_on_batch` runs."""

    def __init__(self, head, k, temperature, vocab, **kwargs):
        # float32 whatever the teacher's policy (its hidden states are cast
        # to it): the softmax is normalized over the whole vocabulary.
        super().__init__(dtype="float32", **kwargs)
        self.kernel, self.layout, self.cap = head
        self.k, self.temperature, self.vocab = k, temperature, vocab

    def call(self, hidden):
        return kd_ops.fused_linear_top_k(
            hidden,
            self.kernel,
            self.k,
            temperature=self.temperature,
            kernel_layout=self.layout,
            logit_soft_cap=self.cap,
            vocabulary_size=self.vocab,
        )


def _pad_rows(batch, rows):
    """`batch` with its rows padded (zeros) to `rows`: one compiled
    shape for every batch."""
    pad = rows - len(next(iter(batch.values())))
    if pad == 0:
        return batch
    return {
        key: np.concatenate([value, np.zeros_like(value[:pad])])
        for key, value in batch.items()
    }


def cache_causal_lm_top_k(
    teacher,
    x,
    k,
    path=None,
    batch_size=8,
    temperature=1.0,
    vocabulary_size=None,
    dtype="float16",
):
    """Runs a keras-hub causal LM teacher once over `x` and keeps, per
    token, its `k` largest log-probabilities, their ids, and the log of its
    remaining probability mass (one tail bucket).

    The teacher runs in inference mode, `batch_size` sequences at a time;
    its output head is applied to the hidden states in blocks of tokens,
    so neither a batch's nor the whole data's `[tokens, vocab]` logits
    exist. With the tail bucket the cache defines a `k + 1`-outcome
    teacher distribution, and `CausalLMDistiller(student)` (no teacher)
    trains on the exact KL between it and the student's distribution over
    the same buckets (`keras_kd.ops.fused_linear_top_k_divergence`); at
    `k = vocab` that is the full KL.

    The log-probabilities are those of `softmax(logits / temperature)`: a
    cache is made for one temperature (the top-k buckets at another
    temperature need the logits the cache left out). It is recorded in
    the cache, and training at another temperature gives a NaN loss.

    Args:
        teacher: a keras-hub `CausalLM` (its backbone and output head are
            used; its preprocessor is not).
        x: the preprocessed inputs, a dict of `[rows, length]` arrays
            (`token_ids`, `padding_mask`), in the order `fit` will see them.
        k: ids kept per token, `1 <= k <= vocab`.
        path: a directory; when given, the arrays are written there as
            `.npy` files and returned as memory maps (reopen them with
            `load_causal_lm_top_k(path)`); else kept in memory.
        batch_size: sequences per teacher call.
        temperature: the distillation temperature `T > 0`.
        vocabulary_size: use only the first `vocabulary_size` ids of the
            teacher's head (the student's vocabulary, when the teacher's
            is padded); `None` uses all.
        dtype: `"float16"` (`6k + 4` bytes per token, each log-probability
            to ~3 significant digits) or `"float32"` (`8k + 4`).

    Returns:
        A dict of arrays: `teacher_top_k_log_probs` `[rows, length, k]`,
        `teacher_top_k_ids` `[rows, length, k]` (int32, largest first),
        `teacher_tail_log_prob` `[rows, length]` (float32, `-inf` where the
        top k hold all the mass) and `teacher_temperature` `[rows]`.
        Train with `distiller.fit({**x, **cache}, y, sample_weight=w)`.

    Example:

    ```python
    x, y, w = teacher.preprocessor(texts)
    cache = keras_kd.cache_causal_lm_top_k(teacher, x, k=64, path="cache")
    distiller = keras_kd.CausalLMDistiller(student)  # no teacher
    distiller.compile("adamw", alpha=0.5)
    distiller.fit({**x, **cache}, y, sample_weight=w)
    ```
    """
    check_causal_lm("teacher", teacher)
    output = output_head(teacher, "teacher")
    kernel, layout, _ = output
    full = kernel.shape[1 if layout == "hv" else 0]
    if vocabulary_size is None:
        vocabulary_size = full
    vocab = _checks.integer("vocabulary_size", vocabulary_size, low=1)
    if vocab > full:
        raise _checks.invalid(
            "vocabulary_size", f"at most the teacher's {full} ids", vocab
        )
    k = _checks.integer("k", k, low=1)
    if k > vocab:
        raise _checks.invalid("k", f"at most the vocabulary {vocab}", k)
    batch_size = _checks.integer("batch_size", batch_size, low=1)
    temperature = _checks.number(
        "temperature", temperature, low=0.0, low_open=True
    )
    _checks.choice("dtype", dtype, ("float16", "float32"))
    if not isinstance(x, dict) or len(np.shape(x.get("token_ids"))) != 2:
        raise _checks.invalid(
            "x",
            "a dict of `[rows, length]` arrays with `token_ids` (the output "
            "of a keras-hub `CausalLMPreprocessor`)",
            type(x).__name__,
        )
    rows, length = np.shape(x["token_ids"])
    if path is not None:
        os.makedirs(path, exist_ok=True)
        stale = os.path.join(path, METADATA)
        if os.path.exists(stale):
            # Written last: a cache without it is known to be incomplete.
            os.remove(stale)
    stored = {
        LOG_PROBS: allocate(path, LOG_PROBS, (rows, length, k), dtype),
        IDS: allocate(path, IDS, (rows, length, k), "int32"),
        TAIL: allocate(path, TAIL, (rows, length), "float32"),
        TEMPERATURE: allocate(path, TEMPERATURE, (rows,), "float32"),
    }
    stored[TEMPERATURE][:] = temperature
    backbone = teacher.backbone
    head = _TopKHead(output, k, temperature, vocab)
    model = keras.Model(backbone.input, head(backbone.output))
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        batch = {key: np.asarray(value[start:stop]) for key, value in x.items()}
        batch = _pad_rows(inputs_for(backbone, batch), min(batch_size, rows))
        # predict_on_batch: compiled on JAX and TensorFlow, no autograd
        # graph on torch.
        arrays = model.predict_on_batch(batch)
        for key, array in zip((LOG_PROBS, IDS, TAIL), arrays):
            stored[key][start:stop] = array[: stop - start]
    if path is not None:
        for array in stored.values():
            array.flush()
        metadata = {
            "format": _FORMAT,
            "version": _VERSION,
            "rows": int(rows),
            "length": int(length),
            "k": k,
            "vocabulary_size": vocab,
            "temperature": temperature,
            "dtype": dtype,
        }
        with open(os.path.join(path, METADATA), "w") as file:
            json.dump(metadata, file, indent=1)
    return stored


def _invalid_file(file, why):
    return ValueError(f"Invalid top-k cache file {file!r}: {why}.")


def _metadata(path):
    file = os.path.join(path, METADATA)
    if not os.path.exists(file):
        raise _invalid_file(
            file,
            "missing: the directory holds no complete cache written by "
            "`cache_causal_lm_top_k` (the file is written last)",
        )
    try:
        with open(file) as handle:
            metadata = json.load(handle)
        ok = metadata.get("format") == _FORMAT
    except (ValueError, OSError, AttributeError) as error:
        raise _invalid_file(file, f"not readable metadata ({error})") from None
    if not ok or metadata.get("version") != _VERSION:
        raise _invalid_file(
            file, f"not a version-{_VERSION} `{_FORMAT}` metadata file"
        )
    return metadata


def load_causal_lm_top_k(path):
    """Reopens a cache written by `cache_causal_lm_top_k(path=...)` as
    read-only memory maps, after checking every file against the metadata.

    Returns:
        The dict `cache_causal_lm_top_k` returned.

    Raises:
        ValueError: naming the file, when one is missing, truncated, not a
            NumPy array file, or of another shape, dtype or temperature
            than the metadata records.
    """
    meta = _metadata(path)
    rows, length, k = meta["rows"], meta["length"], meta["k"]
    expected = {
        LOG_PROBS: ((rows, length, k), meta["dtype"]),
        IDS: ((rows, length, k), "int32"),
        TAIL: ((rows, length), "float32"),
        TEMPERATURE: ((rows,), "float32"),
    }
    found = {}
    for key, (shape, dtype) in expected.items():
        file = os.path.join(path, key + ".npy")
        try:
            # allow_pickle=False: a cache holds numbers only.
            array = np.load(file, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            raise _invalid_file(
                file, f"missing, truncated or not a NumPy array ({error})"
            ) from None
        if array.shape != shape or array.dtype != np.dtype(dtype):
            raise _invalid_file(
                file,
                f"expected shape {shape} and dtype {dtype} (from {METADATA}),"
                f" found {array.shape} and {array.dtype}",
            )
        found[key] = array
    temperatures = np.asarray(found[TEMPERATURE])
    if not np.all(temperatures == np.float32(meta["temperature"])):
        raise _invalid_file(
            os.path.join(path, TEMPERATURE + ".npy"),
            f"every row should hold the temperature {meta['temperature']}",
        )
    return found


def cached_teacher(x):
    """The cached arrays of the batch `x`, gradient-free, in the order of
    `fused_linear_top_k_divergence`'s teacher arguments."""
    if isinstance(x, dict) and all(key in x for key in KEYS):
        return tuple(ops.stop_gradient(x[key]) for key in KEYS)
    keys = sorted(x) if isinstance(x, dict) else type(x).__name__
    raise ValueError(
        "Invalid value for argument `x`. A `CausalLMDistiller` without a "
        "teacher expects the student's inputs and the arrays of "
        f"`cache_causal_lm_top_k` ({', '.join(KEYS)}) in one dict, e.g. "
        "`{**x, **keras_kd.cache_causal_lm_top_k(teacher, x, k)}`. "
        f"Received: x with {keys}"
    )
