"""How `FeatureDistiller` reads named layers and maps student features to
the teacher's width: functional views, argument parsing, projections."""

import keras

from keras_kd import _checks
from keras_kd import losses as kd_losses

_LOSS_ALIASES = {
    "mse": kd_losses.FeatureMeanSquaredError,
    "mean_squared_error": kd_losses.FeatureMeanSquaredError,
    "cosine": kd_losses.FeatureCosineDistance,
    "attention": kd_losses.AttentionTransfer,
    "attention_transfer": kd_losses.AttentionTransfer,
}
_PROJECTIONS = ("auto", "dense", "conv", None)


def symbolic_endpoint(model, attribute):
    """`model.input` / `model.output` as a structure of `KerasTensor`s."""
    try:
        return getattr(model, attribute)
    except (AttributeError, ValueError):
        pass
    values = getattr(model, attribute + "s", None)
    if not values:
        raise ValueError(
            "Invalid value for argument `student`/`teacher`. Feature "
            "distillation reads named layers from the model's graph, so it "
            "needs a Functional or Sequential model built on `keras.Input`. "
            f"Received: model={model.name} of type {type(model).__name__} "
            f"with no symbolic {attribute}s"
        )
    return values[0] if len(values) == 1 else values


def _layer_names(model):
    return [layer.name for layer in getattr(model, "layers", [])]


def _feature_symbol(model, path, role):
    """The symbolic output named by `path` in `model`.

    `path` is a layer name, or `"layer/key"` for one entry of a layer's
    dict output (a keras-hub backbone's `"sequence_output"`, say). Layers
    inside a nested model cannot be read without running part of that
    model a second time, so they are refused with the names that can be
    used.
    """
    head, _, key = path.partition("/")
    try:
        layer = model.get_layer(head)
        # The output of the layer's call in `model`'s graph. A nested
        # Functional model's own `output` property names its inner graph's
        # outputs instead, which a view would compute a second time.
        output = keras.Operation.output.fget(layer)
        if keras.tree.is_nested(layer.output):
            flat = output if isinstance(output, (list, tuple)) else [output]
            output = keras.tree.pack_sequence_as(layer.output, list(flat))
    except (ValueError, AttributeError) as error:
        raise ValueError(
            f"Invalid value for argument `features`. Expected names of "
            f"{role} layers, each called once in the model (a layer inside "
            "a nested model cannot be read in the same pass: name the nested "
            "model, or `name/key` for one entry of its dict output). "
            f"Received: {path!r} ({error}). Layers of {model.name!r}: "
            f"{_layer_names(model)}"
        ) from None
    if isinstance(output, dict):
        if key not in output:
            raise _checks.invalid(
                "features",
                f"one entry of the dict output of {role} layer {head!r} as "
                f"'{head}/<key>' with <key> in {sorted(output)}",
                path,
            )
        return output[key]
    if key:
        raise _checks.invalid(
            "features",
            f"a {role} layer name; {head!r} has a single output, so "
            f"{key!r} cannot select from it",
            path,
        )
    if not hasattr(output, "shape"):
        raise _checks.invalid(
            "features", f"a {role} layer with a single tensor output", path
        )
    return output


def feature_view(model, paths, role):
    """A functional model `x -> (outputs, [features...])` over `model`'s
    own layers (one call computes the outputs and the named layers'
    outputs together), and the symbolic features."""
    inputs = symbolic_endpoint(model, "input")
    outputs = symbolic_endpoint(model, "output")
    features = [_feature_symbol(model, path, role) for path in paths]
    view = keras.Model(inputs, (outputs, features), name=f"{role}_features")
    return view, features


def as_list(name, value, count):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected one entry "
                f"per feature pair ({count}). Received: {name}={value!r}"
            )
        return list(value)
    return [value] * count


def feature_pairs(features):
    if isinstance(features, dict):
        features = list(features.items())
    pairs = []
    for pair in features if isinstance(features, (list, tuple)) else [None]:
        if (
            not isinstance(pair, (list, tuple))
            or len(pair) != 2
            or not all(isinstance(n, str) for n in pair)
        ):
            raise ValueError(
                "Invalid value for argument `features`. Expected a list of "
                "(student_layer_name, teacher_layer_name) pairs or a dict "
                f"student name -> teacher name. Received: features={features!r}"
            )
        pairs.append(tuple(pair))
    if not pairs:
        raise ValueError(
            "Invalid value for argument `features`. Expected at least one "
            f"pair of layer names. Received: features={features!r}"
        )
    return pairs


def resolve_feature_loss(loss):
    if isinstance(loss, str) and loss in _LOSS_ALIASES:
        return _LOSS_ALIASES[loss]()
    if isinstance(loss, keras.losses.Loss):
        return loss
    raise ValueError(
        "Invalid value for argument `feature_loss`. Expected one of "
        f"{sorted(_LOSS_ALIASES)} or a `keras.losses.Loss` instance. "
        f"Received: feature_loss={loss!r}"
    )


def make_projection(kind, student_feature, teacher_feature, loss):
    """The layer mapping a student feature to the teacher's width, or
    `None` when none is needed (or wanted)."""
    if isinstance(kind, keras.layers.Layer):
        layer = kind
    elif kind is None:
        return None
    elif kind not in _PROJECTIONS:
        raise ValueError(
            "Invalid value for argument `projection`. Expected 'auto', "
            "'dense', 'conv', None or a `keras.layers.Layer`. Received: "
            f"projection={kind!r}"
        )
    else:
        width = teacher_feature.shape[-1]
        rank = len(student_feature.shape)
        if kind == "auto":
            # Attention maps are width-free; equal widths need no mapping.
            same = student_feature.shape[-1] == width
            if same or isinstance(loss, kd_losses.AttentionTransfer):
                return None
            kind = "dense"
        if kind == "conv" and 3 <= rank <= 5:
            conv = (
                keras.layers.Conv1D,
                keras.layers.Conv2D,
                keras.layers.Conv3D,
            )[rank - 3]
            layer = conv(width, 1)
        else:
            # On a channels-last map a Dense layer is a 1x1 convolution.
            layer = keras.layers.Dense(width)
    symbolic = keras.KerasTensor(
        student_feature.shape, dtype=student_feature.dtype
    )
    layer(symbolic)
    return layer
