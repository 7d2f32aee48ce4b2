"""Small pieces the Distiller family shares: feeding each model its own
inputs, gradient-free teacher calls, and tensor hygiene for losses."""

import contextlib

import keras
import numpy as np
from keras import ops


def inputs_for(model, x):
    """The part of the batch `x` that `model` takes.

    A dict batch is narrowed to the model's own inputs, picked by name: a
    Functional model built on a dict of `keras.Input`s gets those keys, one
    built on named inputs gets them in its order. Keras would otherwise map
    a dict with extra keys onto the inputs by position, so a student
    without `segment_ids` could receive them as its `token_ids`. Anything
    else (arrays, lists, a subclassed model with no symbolic inputs) is
    passed through.
    """
    if not isinstance(x, dict):
        return x
    try:
        spec = model.input
    except (AttributeError, ValueError):
        return x
    if isinstance(spec, dict):
        names = list(spec)
    else:
        names = [getattr(t, "name", None) for t in keras.tree.flatten(spec)]
        if not all(name in x for name in names):
            return x
    missing = [name for name in names if name not in x]
    if missing:
        raise ValueError(
            "Invalid value for argument `x`. Expected a dict with the inputs "
            f"of model {model.name!r}: {names}. Received: x with keys "
            f"{sorted(x)} (missing {missing})"
        )
    if isinstance(spec, dict):
        return {name: x[name] for name in names}
    if len(names) == 1 and not isinstance(spec, (list, tuple)):
        return x[names[0]]
    return [x[name] for name in names]


def no_grad():
    """A context in which PyTorch records no autograd graph.

    Only PyTorch records one eagerly for every operation on weights that
    require a gradient; the other backends differentiate only what the loss
    asks for, so they need nothing here.
    """
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def frozen_call(model, x):
    """`model` on its part of `x` in inference mode, behind stop_gradient."""
    with no_grad():
        outputs = model(inputs_for(model, x), training=False)
    return keras.tree.map_structure(ops.stop_gradient, outputs)


def own_copy(sample_weight):
    """A copy of `sample_weight` for one loss call.

    Keras' loss masking multiplies the sample weight in place on PyTorch,
    so handing one tensor to several losses would weight the later ones by
    the earlier ones' masks (and break autograd). Tensors of the other
    backends are immutable and passed as they are.
    """
    if sample_weight is None or keras.backend.backend() != "torch":
        return sample_weight
    return keras.tree.map_structure(
        lambda w: None if w is None else ops.copy(w), sample_weight
    )


def batch_size(x):
    """The number of examples in the batch `x`, as a float32 scalar."""
    first = next(t for t in keras.tree.flatten(x) if t is not None)
    return ops.cast(ops.shape(first)[0], "float32")


def unscale_for_replicas(value):
    """Undoes the `1 / replicas` factor Keras losses carry under a
    `tf.distribute` strategy, so trackers record the per-batch mean."""
    if keras.backend.backend() != "tensorflow":
        return value
    import tensorflow as tf

    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas > 1:
        value = value * ops.cast(replicas, value.dtype)
    return value


def carry_weights_without_labels(y, fit_kwargs):
    """`(y, fit_kwargs)` with stand-in labels wherever sample weights come
    without labels (in `fit`/`evaluate` or in `validation_data`)."""
    if y is None and fit_kwargs.get("sample_weight") is not None:
        y = labels_placeholder(_rows(fit_kwargs["sample_weight"]))
    validation = fit_kwargs.get("validation_data")
    if isinstance(validation, (list, tuple)) and len(validation) == 3:
        vx, vy, vw = validation
        if vy is None and vw is not None:
            validation = (vx, labels_placeholder(_rows(vw)), vw)
            fit_kwargs = dict(fit_kwargs, validation_data=validation)
    return y, fit_kwargs


def _rows(structure):
    return len(keras.tree.flatten(structure)[0])


def labels_placeholder(rows):
    """Zero-width stand-in labels `[rows, 0]`.

    Keras drops `sample_weight` from `fit(x, sample_weight=w)` when `y` is
    None; with this in place of `y` the weights reach `compute_loss`, which
    reads a zero-width `y` as "no labels".
    """
    return np.zeros((rows, 0), "float32")


def is_placeholder(y):
    """Whether `y` is (a batch of) `labels_placeholder`."""
    shape = getattr(y, "shape", None)
    return shape is not None and len(shape) == 2 and shape[-1] == 0


def shapes(structure):
    return keras.tree.map_structure(
        lambda t: tuple(getattr(t, "shape", ())), structure
    )


def check_pairs(teacher_outputs, student_outputs):
    """Raises a `ValueError` unless teacher and student outputs have the
    same nesting and compatible shapes (`None` matches any size)."""
    try:
        keras.tree.assert_same_structure(teacher_outputs, student_outputs)
        same = all(
            _compatible(t.shape, s.shape)
            for t, s in zip(
                keras.tree.flatten(teacher_outputs),
                keras.tree.flatten(student_outputs),
            )
        )
    except (ValueError, TypeError, AttributeError):
        same = False
    if not same:
        raise ValueError(
            "Invalid value for argument `teacher`. Expected teacher outputs "
            "with the same structure and shape as the student's outputs "
            f"{shapes(student_outputs)}. Received: teacher output shape "
            f"{shapes(teacher_outputs)}. To distill only some outputs, "
            "override `compute_distillation_loss`."
        )


def _compatible(a, b):
    a, b = tuple(a), tuple(b)
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def regularization(losses):
    """The sum of a model's regularization `losses` in float32, or `None`
    when it has none."""
    if not losses:
        return None
    return ops.sum(ops.stack([ops.cast(ops.sum(v), "float32") for v in losses]))


def deserialized(config, keys, custom_objects=None):
    """A copy of `config` with its entries under `keys` (serialized Keras
    objects, where present) deserialized."""
    config = dict(config)
    for key in keys:
        if key in config:
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
    return config
