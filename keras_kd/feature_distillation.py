"""`FeatureDistiller`: hint distillation from intermediate layers, with the
student's forward pass run once per step."""

import numbers

import keras
from keras import ops

from keras_kd import losses as kd_losses
from keras_kd._distiller_utils import no_grad as inference_only
from keras_kd._keras_compat import LossTrackers as LossTerms
from keras_kd.api import export
from keras_kd.distiller import Distiller

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


def feature_view(model, layer_names, role):
    """A functional model `x -> (outputs, [features...])` over `model`'s
    own layers (one call computes the outputs and the named layers' outputs
    together), and the symbolic features."""
    inputs = symbolic_endpoint(model, "input")
    outputs = symbolic_endpoint(model, "output")
    features = []
    for name in layer_names:
        try:
            features.append(model.get_layer(name).output)
        except (ValueError, AttributeError) as error:
            raise ValueError(
                f"Invalid value for argument `features`. Expected names of "
                f"{role} layers, each called once in the model. Received: "
                f"{name!r} ({error})"
            ) from None
    view = keras.Model(inputs, (outputs, features), name=f"{role}_features")
    return view, features


def _as_list(name, value, count):
    if isinstance(value, (list, tuple)):
        if len(value) != count:
            raise ValueError(
                f"Invalid value for argument `{name}`. Expected one entry "
                f"per feature pair ({count}). Received: {name}={value!r}"
            )
        return list(value)
    return [value] * count


def _feature_pairs(features):
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


def _feature_loss(loss):
    if isinstance(loss, str) and loss in _LOSS_ALIASES:
        return _LOSS_ALIASES[loss]()
    if isinstance(loss, keras.losses.Loss):
        return loss
    raise ValueError(
        "Invalid value for argument `feature_loss`. Expected one of "
        f"{sorted(_LOSS_ALIASES)} or a `keras.losses.Loss` instance. "
        f"Received: feature_loss={loss!r}"
    )


def _weight(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not value >= 0
    ):
        raise ValueError(
            f"Invalid value for argument `{name}`. Expected a number >= 0. "
            f"Received: {name}={value!r}"
        )
    return float(value)


def _make_projection(kind, student_feature, teacher_feature, loss):
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


@export
class FeatureDistiller(Distiller):
    """A `Distiller` that also matches intermediate features (hints).

    Named student layers are trained to match named teacher layers,
    optionally through a learned projection, on top of the usual
    distillation of the outputs.

    Formula:

    ```
    distillation_loss = logits_weight * distillation_loss(teacher(x), s(x))
        + sum_k weight_k * feature_loss_k(t_k(x), projection_k(s_k(x)))
    loss = alpha * student_loss + (1 - alpha) * distillation_loss
    ```

    with `t_k`, `s_k` the k-th named teacher and student layers. The
    feature term is also logged on its own as `feature_loss`.

    One forward pass per step: the student runs once, as a functional view
    of its own layers that returns the outputs and the named layers'
    outputs together, so dropout is drawn once and BatchNormalization
    updates its moving statistics once per step. The teacher runs once per
    step (inference mode, no gradient) the same way. This needs Functional
    or Sequential models built on `keras.Input` (a subclassed model has no
    graph to read layers from), and named layers called once in the model.

    Projections are ordinary layers of the Distiller, trained with the
    student and saved with the Distiller, but not part of
    `distiller.student`, which stays the plain student to export.

    Args:
        student: the `keras.Model` to train (Functional or Sequential).
        teacher: a built Functional or Sequential `keras.Model`.
        features: `(student_layer_name, teacher_layer_name)` pairs, or a
            dict student name -> teacher name.
        feature_loss: `"mse"` (`losses.FeatureMeanSquaredError`),
            `"cosine"` (`losses.FeatureCosineDistance`), `"attention"`
            (`losses.AttentionTransfer`) or a `keras.losses.Loss` called as
            `loss(teacher_feature, student_feature, sample_weight)`; one
            for all pairs or a list.
        feature_weight: weight `>= 0` of each feature term (one or a list).
        projection: `"auto"` (a `Dense` layer when the last-axis widths
            differ, none otherwise or for attention transfer), `"dense"`,
            `"conv"` (a 1x1 `Conv1D/2D/3D` by rank), `None`, or a
            `keras.layers.Layer` (used for a single pair); one or a list.
        logits_weight: weight `>= 0` of the output distillation term; 0 for
            features alone.
        **kwargs: passed to `keras.Model`.

    Example:

    ```python
    distiller = keras_kd.FeatureDistiller(
        student, teacher,
        features=[("student_block2", "teacher_block3")],
        feature_loss="attention",
        feature_weight=100.0,
    )
    distiller.compile("adam", loss=..., distillation_loss=..., alpha=0.5)
    distiller.fit(x, y)
    ```

    Reference:
        Romero et al. FitNets: Hints for Thin Deep Nets. ICLR 2015.
    """

    def __init__(
        self,
        student,
        teacher,
        features,
        feature_loss="mse",
        feature_weight=1.0,
        projection="auto",
        logits_weight=1.0,
        **kwargs,
    ):
        super().__init__(student, teacher, **kwargs)
        pairs = _feature_pairs(features)
        count = len(pairs)
        self.features = pairs
        self.feature_losses = [
            _feature_loss(loss)
            for loss in _as_list("feature_loss", feature_loss, count)
        ]
        self.feature_weights = [
            _weight("feature_weight", w)
            for w in _as_list("feature_weight", feature_weight, count)
        ]
        self.logits_weight = _weight("logits_weight", logits_weight)
        student_view, student_features = feature_view(
            student, [s for s, _ in pairs], "student"
        )
        teacher_view, teacher_features = feature_view(
            teacher, [t for _, t in pairs], "teacher"
        )
        # The views share the models' layers and variables; kept off the
        # tracker, so weights are listed (and saved) once, via the models.
        object.__setattr__(self, "_student_view", student_view)
        object.__setattr__(self, "_teacher_view", teacher_view)
        object.__setattr__(self, "_pending", None)
        kinds = _as_list("projection", projection, count)
        if isinstance(projection, keras.layers.Layer) and count > 1:
            raise ValueError(
                "Invalid value for argument `projection`. A layer instance "
                "can serve one feature pair; give a list of layers. "
                f"Received: projection={projection!r} for {count} pairs"
            )
        self.projections = [
            _make_projection(kind, s, t, loss)
            for kind, s, t, loss in zip(
                kinds, student_features, teacher_features, self.feature_losses
            )
        ]
        self._projection_config = [
            kind if not isinstance(kind, keras.layers.Layer) else "layer"
            for kind in kinds
        ]
        self._feature_loss_tracker = keras.metrics.Mean(name="feature_loss")
        self._feature_loss_tracker._direction = "down"
        self._feature_term = LossTerms(
            [self._feature_loss_tracker], name="feature_loss_terms"
        )

    # ------------------------------------------------------------ forward

    def call(self, inputs, training=None):
        """Runs the student once and keeps the named layers' outputs of
        that same pass for `compute_loss`; returns the student's outputs."""
        outputs, features = self._student_view(inputs, training=training)
        object.__setattr__(self, "_pending", (outputs, features))
        return outputs

    def teacher_predictions(self, x):
        """The teacher's `(outputs, features)` from one inference pass."""
        with inference_only():
            outputs, features = self._teacher_view(x, training=False)
        return keras.tree.map_structure(
            ops.stop_gradient, (outputs, list(features))
        )

    def student_features(self, x, y_pred):
        """The named student layers' outputs of the pass that gave
        `y_pred` (a fresh inference pass if `y_pred` came from elsewhere).
        """
        pending = self._pending
        object.__setattr__(self, "_pending", None)
        if pending is not None and pending[0] is y_pred:
            return list(pending[1])
        _, features = self._student_view(x, training=False)
        return list(features)

    # --------------------------------------------------------------- loss

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        """`logits_weight * output term + weighted feature terms`."""
        teacher_outputs, teacher_features = teacher_pred
        student_features = self.student_features(x, y_pred)
        weight = sample_weight
        if isinstance(weight, (list, tuple, dict)):
            # Per-output weights do not say how to weight hidden features.
            weight = None
        feature_total = None
        for loss, w, proj, t, s in zip(
            self.feature_losses,
            self.feature_weights,
            self.projections,
            teacher_features,
            student_features,
        ):
            if proj is not None:
                s = proj(s)
            value = loss(t, s, sample_weight=weight) * w
            feature_total = (
                value if feature_total is None else feature_total + value
            )
        if self.logits_weight > 0:
            logits = super().compute_distillation_loss(
                x, y, y_pred, teacher_outputs, sample_weight
            )
            total = self.logits_weight * logits + ops.cast(
                feature_total, logits.dtype
            )
        else:
            total = feature_total
        batch_size = ops.shape(
            next(t for t in keras.tree.flatten(x) if t is not None)
        )[0]
        self._feature_loss_tracker.update_state(
            feature_total, sample_weight=batch_size
        )
        return total

    @property
    def metrics(self):
        metrics = super().metrics
        if not self.compiled:
            return metrics
        skip = {id(self._feature_term), id(self._feature_loss_tracker)}
        metrics = [m for m in metrics if id(m) not in skip]
        return metrics[:2] + [self._feature_term] + metrics[2:]

    # ------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        projections = []
        for kind, layer in zip(self._projection_config, self.projections):
            if kind == "layer":
                kind = keras.saving.serialize_keras_object(layer)
            projections.append(kind)
        config.update(
            features=[list(pair) for pair in self.features],
            feature_loss=[
                keras.saving.serialize_keras_object(loss)
                for loss in self.feature_losses
            ],
            feature_weight=list(self.feature_weights),
            projection=projections,
            logits_weight=self.logits_weight,
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["feature_loss"] = [
            keras.saving.deserialize_keras_object(
                loss, custom_objects=custom_objects
            )
            for loss in config["feature_loss"]
        ]
        config["projection"] = [
            keras.saving.deserialize_keras_object(
                kind, custom_objects=custom_objects
            )
            if isinstance(kind, dict)
            else kind
            for kind in config["projection"]
        ]
        return super().from_config(config, custom_objects=custom_objects)
