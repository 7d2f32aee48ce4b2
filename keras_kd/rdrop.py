"""R-Drop: consistency between two dropout draws of the same example."""

import inspect

import keras
from keras import ops, tree

from keras_kd import losses as kd_losses
from keras_kd.api import export
from keras_kd.losses.rdrop import validate_alpha

try:
    # The Keras mask of a tensor (from `Embedding(mask_zero=True)` and
    # friends). JAX arrays cannot carry attributes, so Keras keeps their
    # masks in a side table that only this accessor reads.
    from keras.src.backend import get_keras_mask as _get_keras_mask
except ImportError:  # pragma: no cover - depends on the Keras version

    def _get_keras_mask(x):
        return getattr(x, "_keras_mask", None)


def _repeat_pairs(structure):
    """`[a, b, ...] -> [a, a, b, b, ...]` along axis 0 of every tensor."""
    return tree.map_structure(
        lambda t: None if t is None else ops.repeat(t, 2, axis=0), structure
    )


@export
class RDrop(keras.Model):
    """Trains `model` with R-Drop: each example twice, in one forward pass.

    While training, every batch `[x0, x1, ...]` becomes the interleaved batch
    `[x0, x0, x1, x1, ...]` inside the model and goes through `model` once,
    so dropout draws two different sub-networks for each example. The
    compiled loss is applied to both copies (labels and sample weights are
    repeated), and the symmetric divergence of each pair is added:

    Formula:

    ```
    loss = mean_rows(compiled_loss(y, p))
           + alpha / 4 * mean_pairs(KL(p1 || p2) + KL(p2 || p1))
    ```

    Per pair this is `(CE1 + CE2 + alpha / 2 * (KL12 + KL21)) / 2`: the
    paper's loss for one example divided by its two rows. So `alpha` is the
    paper's alpha, the official fairseq criterion's `--reg-alpha` (which
    sums both terms over the pairs and divides by the number of tokens of
    one copy, i.e. twice this loss for the same alpha) and the alpha of
    Su's bert4keras `categorical_crossentropy_with_rdrop`. The official
    README snippet averages CE over the batch but sums the KL over it; its
    alpha corresponds to `alpha = 2 * batch_size * alpha_readme` here.

    `evaluate` and `predict` run `model` once on the batch as it is. Compiled
    metrics see one copy of each example. The history carries `loss` (the
    total) and `rdrop_divergence` (the mean pair divergence, before
    `alpha / 4`). Duplicating every example leaves the mean and variance of
    a batch unchanged, so `BatchNormalization` statistics are unaffected.

    The divergence:

    - `divergence=None` infers it from the compiled loss when training
      starts: `SymmetricKLDivergence(from_logits=loss.from_logits)` for
      categorical crossentropies (a string loss such as
      `"sparse_categorical_crossentropy"` means probabilities, as in Keras);
      `GlobalPointerKLDivergence()` for `MultilabelCategoricalCrossentropy`
      and its sparse form, and for a binary crossentropy of logits. Other
      losses raise a `ValueError`: pass `divergence` explicitly, so that
      logits are never mistaken for probabilities.
    - Otherwise a `keras.losses.Loss` (its unreduced `call` is used: RDrop
      reduces it) or a function `(a, b) -> value` with the class axis
      removed. For several outputs, one divergence for all, or a list/dict
      matching the outputs.

    Masks: for sequence outputs `[batch, length, classes]` the divergence is
    per token and averaged like the compiled loss: padded tokens (the Keras
    mask of the output, e.g. from `Embedding(mask_zero=True)`, or a zero
    `sample_weight` of shape `[batch, length]`) contribute nothing to either
    term. GlobalPointer logits carry their mask as `-inf`.

    Unlabeled data: with `compile(loss=None)`, or when the data has no
    targets, the objective is the divergence alone (plus any `add_loss`
    terms): consistency regularization for semi-supervised training.

    Args:
        model: the `keras.Model` to train; used as is for inference.
        alpha: weight of the consistency term, `>= 0`.
        divergence: see above; `None` infers it from the compiled loss.
        **kwargs: passed on to `keras.Model` (e.g. `name`).

    Example:

    ```python
    rdrop = keras_kd.RDrop(model, alpha=4.0)
    rdrop.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["sparse_categorical_accuracy"],
    )
    rdrop.fit(x, y, epochs=3)  # history: loss, rdrop_divergence, accuracy
    model.predict(x)           # the trained model, a single pass
    ```

    Reference:
        Liang et al. R-Drop: Regularized Dropout for Neural Networks.
        NeurIPS 2021. https://arxiv.org/abs/2106.14448
    """

    def __init__(self, model, alpha=1.0, divergence=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(model, keras.Model):
            raise ValueError(
                "Invalid value for argument `model`. Expected a "
                f"`keras.Model`. Received: model={model}"
            )
        self.model = model
        self.alpha = validate_alpha(alpha)
        self.divergence = divergence
        self.divergence_tracker = keras.metrics.Mean(name="rdrop_divergence")
        self._paired = False

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        # Keras keeps the loss of an earlier compile when recompiled with
        # `loss=None`; divergence-only training must not inherit it.
        self.loss = None
        self._compile_loss = None
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile`.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def build(self, input_shape=None):
        if not self.model.built and input_shape is not None:
            self.model.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        """Runs `model`: on the doubled batch when `training` is true.

        Args:
            inputs: the batch, any structure of tensors `[batch, ...]`.
            training: whether this is a training step.

        Returns:
            The outputs of `model`: `[2 * batch, ...]`, pairs of rows from
            the same example, when training; `[batch, ...]` otherwise.
        """
        # Where the doubled batch is made decides what Keras calls y_pred:
        # the trainers pass the output of this call, unchanged, to both
        # `compute_loss` and `compute_metrics`, so one model invocation
        # feeds the loss, the divergence and the metrics.
        self._paired = bool(training)
        if self._paired:
            return self.model(_repeat_pairs(inputs), training=True)
        return self.model(inputs, training=training)

    def compute_loss(
        self,
        x=None,
        y=None,
        y_pred=None,
        sample_weight=None,
        training=True,
    ):
        """The compiled loss of both copies plus `alpha / 4` times the mean
        pair divergence (training), or the plain compiled loss (evaluation).

        Without targets (`y is None`) or without a compiled loss, only the
        divergence (and any `add_loss` terms) is left.
        """
        supervised = y is not None and self.loss is not None
        if not (training and self._paired):
            if supervised:
                return super().compute_loss(
                    x, y, y_pred, sample_weight, training=training
                )
            return self._added_losses()
        divergence = self._pair_divergence(y_pred, sample_weight)
        self.divergence_tracker.update_state(divergence)
        total = (self.alpha / 4.0) * divergence
        if supervised:
            return total + super().compute_loss(
                x,
                _repeat_pairs(y),
                y_pred,
                _repeat_pairs(sample_weight),
                training=training,
            )
        return total + ops.cast(self._added_losses(), total.dtype)

    def _added_losses(self):
        total = ops.zeros((), dtype="float32")
        for extra in self.losses:
            total = total + ops.cast(ops.sum(extra), "float32")
        return total

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._paired:
            y_pred = tree.map_structure(lambda t: _pairs(t)[0], y_pred)
            if y is None or self.loss is None:
                # No targets: the compiled metrics have nothing to compare.
                return self.get_metrics_result()
            return super().compute_metrics(x, y, y_pred, sample_weight)
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        # A single pass has no pairs: a divergence of 0 would be invented.
        logs.pop(self.divergence_tracker.name, None)
        return logs

    # ---------------------------------------------------------- divergence

    def _pair_divergence(self, y_pred, sample_weight):
        outputs = tree.flatten(y_pred)
        divergences = _match_outputs(
            self._divergences(y_pred), outputs, "divergence"
        )
        weights = _match_outputs(
            sample_weight, outputs, "sample_weight", broadcast=True
        )
        total = None
        for output, fn, weight in zip(outputs, divergences, weights):
            value = _reduced_pair_value(output, fn, weight)
            total = value if total is None else total + value
        return total

    def _divergences(self, y_pred):
        if self.divergence is not None:
            return self.divergence
        loss = self.loss
        if loss is None:
            raise ValueError(
                "Invalid value for argument `divergence`. With no compiled "
                "loss R-Drop cannot tell logits from probabilities: pass "
                "e.g. `divergence=keras_kd.losses.SymmetricKLDivergence("
                "from_logits=True)`. Received: divergence=None"
            )
        if isinstance(loss, dict):
            return {k: _infer_divergence(v) for k, v in loss.items()}
        if isinstance(loss, (list, tuple)):
            return [_infer_divergence(value) for value in loss]
        return _infer_divergence(loss)

    # ------------------------------------------------------------- config

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "model": keras.saving.serialize_keras_object(self.model),
                "alpha": self.alpha,
                "divergence": keras.saving.serialize_keras_object(
                    self.divergence
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["model"] = keras.saving.deserialize_keras_object(config["model"])
        config["divergence"] = keras.saving.deserialize_keras_object(
            config.get("divergence")
        )
        return cls(**config)


def _match_outputs(value, outputs, name, broadcast=False):
    """One entry of `value` per output: shared, or a matching structure."""
    if value is None or not isinstance(value, (dict, list, tuple)):
        return [value] * len(outputs)
    flat = tree.flatten(value)
    if len(flat) == len(outputs):
        return flat
    if broadcast and len(flat) == 1:
        return flat * len(outputs)
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected one entry or one per "
        f"model output ({len(outputs)}). Received: {name}={value}"
    )


def _unreduced(fn, a, b):
    if isinstance(fn, keras.losses.Loss):
        return fn.call(a, b)
    return fn(a, b)


def _reduced_pair_value(output, fn, sample_weight):
    """Mean over pairs (and tokens) of the divergence, weighted like a Keras
    `"sum_over_batch_size"` loss: weights scale the terms, masked entries
    leave the count."""
    first, second = _pairs(output)
    value = _unreduced(fn, first, second)
    value = ops.convert_to_tensor(value)
    dtype = value.dtype
    terms = value
    count = ops.cast(ops.size(value), dtype)
    mask = _get_keras_mask(output)
    if mask is not None:
        mask = ops.cast(_to_rank(_pairs(mask)[0], len(value.shape)), dtype)
        mask = ops.broadcast_to(mask, ops.shape(value))
        terms = terms * mask
        count = ops.sum(mask)
    if sample_weight is not None:
        weight = ops.cast(sample_weight, dtype)
        terms = terms * _to_rank(weight, len(value.shape))
    return ops.divide_no_nan(ops.sum(terms), count)


def _pairs(x):
    """The first and second copies of an interleaved batch.

    A reshape to `[pairs, 2, ...]` and an unstack, rather than strided
    slices `x[0::2]`: on TensorFlow the strided slices of a large output
    (a GlobalPointer grid) and their gradients cost as much as the loss.
    """
    shape = ops.shape(x)
    pairs = ops.reshape(x, (-1, 2, *shape[1:]))
    first, second = ops.unstack(pairs, num=2, axis=1)
    return first, second


def _to_rank(x, rank):
    """Squeezes trailing 1-axes or appends axes so that `x` broadcasts
    against a tensor of `rank` with the same leading axes."""
    while len(x.shape) > rank and x.shape[-1] == 1:
        x = ops.squeeze(x, axis=-1)
    while len(x.shape) < rank:
        x = ops.expand_dims(x, -1)
    return x


_MULTILABEL = (
    kd_losses.MultilabelCategoricalCrossentropy,
    kd_losses.SparseMultilabelCategoricalCrossentropy,
)


def _infer_divergence(loss):
    """The divergence that matches a compiled loss, or a `ValueError`."""
    resolved = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(resolved, _MULTILABEL):
        return kd_losses.GlobalPointerKLDivergence()
    from_logits = getattr(resolved, "from_logits", None)
    if from_logits is None and callable(resolved):
        # A Keras loss function given by name: its default applies.
        try:
            parameter = inspect.signature(resolved).parameters.get(
                "from_logits"
            )
        except (TypeError, ValueError):
            parameter = None
        if parameter is not None:
            from_logits = parameter.default
    name = getattr(getattr(resolved, "fn", resolved), "__name__", "")
    name = name or type(resolved).__name__
    if isinstance(from_logits, bool):
        if "binary" not in name.lower():
            return kd_losses.SymmetricKLDivergence(from_logits=from_logits)
        if from_logits:
            return kd_losses.GlobalPointerKLDivergence(axis=-1)
    raise ValueError(
        "Invalid value for argument `divergence`. It cannot be inferred "
        "from the compiled loss; pass it to `RDrop`, e.g. "
        "`keras_kd.losses.SymmetricKLDivergence(from_logits=True)` for "
        "softmax logits or `keras_kd.losses.GlobalPointerKLDivergence()` for "
        f"multi-label logits. Received: divergence=None, loss={loss}"
    )
