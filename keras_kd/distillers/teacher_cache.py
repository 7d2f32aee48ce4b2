"""Teacher outputs computed once and stored: in memory or as memory-mapped
`.npy` files, whole or as the top k logits per row."""

import os

import keras
import numpy as np

from keras_kd import _checks

INPUTS = "inputs"
TEACHER_LOGITS = "teacher_logits"
TOP_K_VALUES = "teacher_top_k_values"
TOP_K_INDICES = "teacher_top_k_indices"


def _rows(x):
    leaves = keras.tree.flatten(x)
    if not leaves or not all(hasattr(a, "shape") for a in leaves):
        raise ValueError(
            "Invalid value for argument `x`. Expected an array, or a list or "
            "dict of arrays, with one row per example (for a dataset, cache "
            f"it batch by batch). Received: x of type {type(x).__name__}"
        )
    return int(leaves[0].shape[0])


def allocate(path, name, shape, dtype):
    """An uninitialized array: in memory, or a `.npy` memory map named
    `name` under the directory `path`."""
    if path is None:
        return np.empty(shape, dtype=dtype)
    return np.lib.format.open_memmap(
        os.path.join(path, name + ".npy"), mode="w+", dtype=dtype, shape=shape
    )


def top_k_numpy(logits, k):
    """The `k` largest logits per row, largest first, and their indices."""
    if k >= logits.shape[-1]:
        indices = np.argsort(-logits, axis=-1, kind="stable")
    else:
        part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
        order = np.argsort(
            -np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable"
        )
        indices = np.take_along_axis(part, order, axis=-1)
    return np.take_along_axis(logits, indices, axis=-1), indices


def cache_teacher_outputs(
    teacher, x, batch_size=256, top_k=None, path=None, dtype="float32"
):
    """Runs the teacher once over `x` and stores its logits.

    The teacher runs in inference mode, batch by batch
    (`teacher.predict_on_batch`); only one batch of full logits is held at
    a time, so a top-k cache of a large-vocabulary teacher never
    materializes `rows x vocabulary` floats.

    Top-k caching keeps the `k` largest logits of each row (values and
    class indices). `OfflineDistiller` then gives every other class a
    logit of `-inf`: the teacher's probability mass outside its top k is
    dropped and the kept probabilities are renormalized to sum to 1 (at
    every temperature). The target distribution is then off by a total
    variation distance of `1 - m`, with `m` the teacher's probability mass
    in its top k at the distillation temperature; for the KL loss the
    value becomes `(1/m) * sum_topk p log(p/q) - log m` instead of
    `KL(p || q)`. Both vanish when `k` is the vocabulary size (`m = 1`).
    Divergences that weight by the student's distribution (reverse KL) are
    infinite against a top-k teacher; use `KLDivergence` or
    `JensenShannonDivergence` with `beta < 1`.

    Args:
        teacher: a `keras.Model` with a single `[..., classes]` output.
        x: the training inputs: an array, or a list/dict of arrays, one row
            per example, in the order they will be given to `fit`.
        batch_size: rows per teacher call.
        top_k: keep only the `k` largest logits per row; `None` keeps all.
        path: a directory; when given, the arrays are written there as
            `.npy` files and returned as memory maps (reopen them with
            `load_teacher_outputs(path)`); otherwise kept in memory.
        dtype: storage dtype of the logits (`"float16"` halves the memory
            at ~3 significant digits; indices are `int32`).

    Returns:
        A dict: `{"teacher_logits": [rows, ..., classes]}`, or with
        `top_k`, `{"teacher_top_k_values": [rows, ..., k],
        "teacher_top_k_indices": [rows, ..., k]}`. Train with
        `distiller.fit({"inputs": x, **cache}, y)`.

    Example:

    ```python
    cache = keras_kd.cache_teacher_outputs(teacher, x_train, top_k=32)
    distiller = keras_kd.OfflineDistiller(student)
    distiller.compile("adam", loss=..., distillation_loss=..., alpha=0.1)
    distiller.fit({"inputs": x_train, **cache}, y_train, epochs=10)
    ```
    """
    _checks.model("teacher", teacher)
    if top_k is not None:
        top_k = _checks.integer("top_k", top_k, low=1)
    batch_size = _checks.integer("batch_size", batch_size, low=1)
    rows = _rows(x)
    if path is not None:
        os.makedirs(path, exist_ok=True)
    stored = None
    for start in range(0, rows, batch_size):
        stop = min(start + batch_size, rows)
        chunk = keras.tree.map_structure(lambda a: a[start:stop], x)
        logits = teacher.predict_on_batch(chunk)
        if isinstance(logits, (list, tuple, dict)):
            raise ValueError(
                "Invalid value for argument `teacher`. Expected a model with "
                "a single output. Received: outputs of type "
                f"{type(logits).__name__}"
            )
        logits = np.asarray(logits, dtype="float32")
        if top_k is None:
            parts = {TEACHER_LOGITS: logits.astype(dtype)}
        else:
            values, indices = top_k_numpy(logits, top_k)
            parts = {
                TOP_K_VALUES: values.astype(dtype),
                TOP_K_INDICES: indices.astype("int32"),
            }
        if stored is None:
            stored = {
                name: allocate(path, name, (rows,) + a.shape[1:], a.dtype)
                for name, a in parts.items()
            }
        for name, a in parts.items():
            stored[name][start:stop] = a
    for array in stored.values():
        if isinstance(array, np.memmap):
            array.flush()
    return stored


def load_teacher_outputs(path):
    """Reopens a cache written by `cache_teacher_outputs(path=...)` as
    read-only memory maps.

    Raises:
        ValueError: naming the file, when the directory holds no cache, a
            file is truncated or not a NumPy array file, or the arrays do
            not fit together (row counts, top-k shapes, dtypes).
    """
    found = {}
    for name in (TEACHER_LOGITS, TOP_K_VALUES, TOP_K_INDICES):
        file = os.path.join(path, name + ".npy")
        if os.path.exists(file):
            found[name] = _open_array(file)
    if not found:
        raise _checks.invalid(
            "path", "a directory written by `cache_teacher_outputs`", path
        )
    _check_cache(found, path)
    return found


def _open_array(file):
    try:
        # allow_pickle=False: a cache holds numbers only, never objects.
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(
            f"Invalid teacher cache file {file!r}: it is truncated or not a "
            f"NumPy array file written by `cache_teacher_outputs` ({error})."
        ) from None
    if not isinstance(array, np.ndarray) or array.ndim < 2:
        raise ValueError(
            f"Invalid teacher cache file {file!r}: expected an array of "
            "shape [rows, ..., classes or k]."
        )
    return array


def _check_cache(found, path):
    for name, array in found.items():
        kind = "i" if name == TOP_K_INDICES else "f"
        if array.dtype.kind != kind:
            raise ValueError(
                f"Invalid teacher cache file {name + '.npy'!r} in {path!r}: "
                f"unexpected dtype {array.dtype}."
            )
    if (TOP_K_VALUES in found) != (TOP_K_INDICES in found):
        raise ValueError(
            f"Invalid teacher cache in {path!r}: a top-k cache needs both "
            f"{TOP_K_VALUES}.npy and {TOP_K_INDICES}.npy."
        )
    if TOP_K_VALUES in found:
        values, indices = found[TOP_K_VALUES], found[TOP_K_INDICES]
        if values.shape != indices.shape:
            raise ValueError(
                f"Invalid teacher cache in {path!r}: top-k values "
                f"{values.shape} and indices {indices.shape} differ in shape."
            )
    rows = {array.shape[0] for array in found.values()}
    if len(rows) > 1:
        raise ValueError(
            f"Invalid teacher cache in {path!r}: the files hold different "
            f"numbers of rows {sorted(rows)}."
        )
