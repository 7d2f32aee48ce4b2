"""`FeatureDistiller`: hint distillation from intermediate layers, with the
student's forward pass run once per step."""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd._keras_compat import LossTrackers
from keras_kd._model_utils import batch_size, frozen_call
from keras_kd.api import export
from keras_kd.distillers._feature_views import (
    as_list,
    feature_pairs,
    feature_view,
    make_projection,
    resolve_feature_loss,
)
from keras_kd.distillers.distiller import Distiller


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
    A layer is named by its name, or as `"layer/key"` for one entry of a
    dict output (e.g. `"gpt2_backbone/sequence_output"` style outputs of
    keras-hub backbones).

    While training, calling the Distiller returns the dict
    `{"outputs": student outputs, "features": [named student features]}`
    of that single pass, which `compute_loss` and `compute_metrics` read;
    `predict`, `evaluate` and `distiller(x)` return the student's outputs.
    Evaluation reads the student's features from one more inference-mode
    pass (no dropout, no statistics updated).

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
        feature_weight: finite weight `>= 0` of each feature term (one or a
            list).
        projection: `"auto"` (a `Dense` layer when the last-axis widths
            differ, none otherwise or for attention transfer), `"dense"`,
            `"conv"` (a 1x1 `Conv1D/2D/3D` by rank), `None`, or a
            `keras.layers.Layer` (used for a single pair); one or a list.
        logits_weight: finite weight `>= 0` of the output distillation term;
            0 for features alone.
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
        pairs = feature_pairs(features)
        count = len(pairs)
        self.features = pairs
        self.feature_losses = [
            resolve_feature_loss(loss)
            for loss in as_list("feature_loss", feature_loss, count)
        ]
        self.feature_weights = [
            _checks.non_negative("feature_weight", w)
            for w in as_list("feature_weight", feature_weight, count)
        ]
        self.logits_weight = _checks.non_negative(
            "logits_weight", logits_weight
        )
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
        kinds = as_list("projection", projection, count)
        if isinstance(projection, keras.layers.Layer) and count > 1:
            raise ValueError(
                "Invalid value for argument `projection`. A layer instance "
                "can serve one feature pair; give a list of layers. "
                f"Received: projection={projection!r} for {count} pairs"
            )
        self.projections = [
            make_projection(kind, s, t, loss)
            for kind, s, t, loss in zip(
                kinds, student_features, teacher_features, self.feature_losses
            )
        ]
        self._projection_config = [
            kind if not isinstance(kind, keras.layers.Layer) else "layer"
            for kind in kinds
        ]
        self.feature_loss_tracker = keras.metrics.Mean(name="feature_loss")
        self._feature_term = LossTrackers(
            [self.feature_loss_tracker], name="feature_loss_terms"
        )

    # ------------------------------------------------------------ forward

    def call(self, inputs, training=None):
        """Runs the student once.

        Returns:
            While training, `{"outputs": ..., "features": [...]}` from that
            one pass; otherwise the student's outputs.
        """
        outputs, features = self._student_view(
            self.student_inputs(inputs), training=training
        )
        if training:
            return {"outputs": outputs, "features": list(features)}
        return outputs

    def teacher_predictions(self, x):
        """The teacher's `(outputs, features)` from one inference pass."""
        outputs, features = frozen_call(self._teacher_view, x)
        return outputs, list(features)

    def _split(self, x, y_pred):
        """The student's outputs and features behind `y_pred`."""
        outputs, features = _parts(y_pred)
        if features is None:
            # Evaluation: y_pred holds the outputs only; the features come
            # from an inference-mode pass, which changes no state.
            _, features = self._student_view(
                self.student_inputs(x), training=False
            )
        return outputs, list(features)

    # --------------------------------------------------------------- loss

    def compute_student_loss(self, x, y, y_pred, sample_weight=None):
        outputs, _ = _parts(y_pred)
        return super().compute_student_loss(x, y, outputs, sample_weight)

    def compute_distillation_loss(
        self, x, y, y_pred, teacher_pred, sample_weight=None
    ):
        """`logits_weight * output term + weighted feature terms`."""
        teacher_outputs, teacher_features = teacher_pred
        outputs, student_features = self._split(x, y_pred)
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
                x, y, outputs, teacher_outputs, sample_weight
            )
            total = self.logits_weight * logits + ops.cast(
                feature_total, logits.dtype
            )
        else:
            total = feature_total
        self.feature_loss_tracker.update_state(
            feature_total, sample_weight=batch_size(x)
        )
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        outputs, _ = _parts(y_pred)
        return super().compute_metrics(x, y, outputs, sample_weight)

    def _extra_terms(self):
        return [self._feature_term]

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


def _parts(y_pred):
    """`(outputs, features)` of a training-mode call, `(y_pred, None)`
    otherwise."""
    if isinstance(y_pred, dict) and set(y_pred) == {"outputs", "features"}:
        return y_pred["outputs"], y_pred["features"]
    return y_pred, None
