"""Argument checks shared by the fused linear losses (`_fused_linear.py`)
and their top-k offline variant (`_fused_top_k.py`): tensors, kernel
layouts and shapes, soft caps and weights, and the student's side of
every loss, each failing with a `ValueError` that names the argument."""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops._chunk_engine import default_chunk_size
from keras_kd.ops._core import validate_temperature

DIVERGENCES = ("kl", "reverse_kl", "jsd")
LAYOUTS = ("hv", "vh")


def tensor(x):
    if x is None:
        return None
    if isinstance(x, keras.Variable) and keras.backend.backend() == (
        "tensorflow"
    ):
        # A variable read inside `tf.custom_gradient` makes it demand a
        # `variables` gradient; read here, the gradient flows to it anyway.
        return ops.copy(x)
    return ops.convert_to_tensor(x)


def shape_error(name, expected, x):
    return ValueError(
        f"Invalid value for argument `{name}`. Expected {expected}. "
        f"Received: {name}.shape={tuple(x.shape)}"
    )


def kernel_vocab(name, kernel, layout, hidden):
    """Returns the kernel's vocabulary size after checking its shape."""
    _checks.choice(f"{name}_layout", layout, LAYOUTS)
    width = hidden.shape[-1]
    h_axis = 0 if layout == "hv" else 1
    if len(kernel.shape) != 2 or kernel.shape[h_axis] != width:
        expected = "[hidden, vocab]" if layout == "hv" else "[vocab, hidden]"
        raise shape_error(
            name, f"a {expected} kernel with hidden = {width}", kernel
        )
    return kernel.shape[1 - h_axis]


def same_leading(name, x, hidden, extra_dims=0):
    lead = tuple(hidden.shape[:-1])
    shape = tuple(x.shape)[: len(x.shape) - extra_dims]
    ok = len(shape) == len(lead) and all(
        a is None or b is None or a == b for a, b in zip(shape, lead)
    )
    if not ok:
        raise shape_error(name, f"the hidden states' leading shape {lead}", x)


def cap(name, value):
    return (
        None
        if value is None
        else _checks.number(name, value, low=0.0, low_open=True)
    )


def weight(name, value):
    if isinstance(value, keras.Variable) or ops.is_tensor(value):
        return tensor(value)
    return _checks.fraction(name, value)


def checked_temperature(value):
    """A valid temperature: a Python float, or a scalar tensor."""
    value = validate_temperature(value)
    return value if isinstance(value, float) else tensor(value)


def checked_chunk_size(value):
    """`None` (the default size), or a whole number of tokens >= 1."""
    if value is None:
        return None
    return _checks.integer("chunk_size", value, low=1)


def student_inputs(hidden, kernel, labels, mask, options):
    """Checks the student's side of a fused loss.

    Args:
        hidden, kernel, labels, mask: as given (`labels` and `mask` may be
            `None`).
        options: `temperature`, `alpha` (already checked), `chunk_size`,
            `student_kernel_layout` and `student_logit_soft_cap`.

    Returns:
        `(student, cfg, vocab)`: the inputs and the static options of
        `_chunk_engine.fused_loss`, and the student's vocabulary size.
    """
    temperature = checked_temperature(options["temperature"])
    chunk_size = checked_chunk_size(options["chunk_size"])
    layout = options["student_kernel_layout"]
    hidden, kernel = tensor(hidden), tensor(kernel)
    vocab = kernel_vocab("student_kernel", kernel, layout, hidden)
    labels, mask = tensor(labels), tensor(mask)
    for name, value in (("labels", labels), ("mask", mask)):
        if value is not None:
            same_leading(name, value, hidden)
    cfg = {
        "labels": labels is not None,
        "student_layout": layout,
        "student_cap": cap(
            "student_logit_soft_cap", options["student_logit_soft_cap"]
        ),
        "temperature_is_one": isinstance(temperature, float)
        and temperature == 1.0,
        "chunk_size": chunk_size or default_chunk_size(vocab),
    }
    student = {
        "student_hidden": hidden,
        "student_kernel": kernel,
        "labels": labels,
        "mask": mask,
        "temperature": temperature,
        "alpha": options["alpha"],
    }
    return student, cfg, vocab
