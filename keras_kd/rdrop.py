"""R-Drop: consistency between two dropout draws of the same example."""

import inspect

import keras
from keras import ops, tree

from keras_kd import _checks
from keras_kd import _keras_compat as compat
from keras_kd import losses as kd_losses
from keras_kd._model_utils import (
    carry_weights_without_labels,
    is_placeholder,
    unscale_for_replicas,
)
from keras_kd.api import export

# `divergence="..."`: R-Drop's KL is symmetric, so "kl" is the symmetric KL.
DIVERGENCE_ALIASES = {
    "kl": lambda: kd_losses.SymmetricKLDivergence(from_logits=True),
    "symmetric_kl": lambda: kd_losses.SymmetricKLDivergence(from_logits=True),
    "global_pointer": lambda: kd_losses.GlobalPointerKLDivergence(),
}


@export
class RDrop(keras.Model):
    """Trains `model` with R-Drop: each example twice, in one forward pass.

    While training, `call` turns the batch `[x0, x1, ...]` into `[x0, x0,
    x1, x1, ...]` and runs `model` on it once: dropout draws two sub-networks
    per example. The compiled loss covers both copies and the divergence of
    each pair is added (per pair, the paper's `(CE1 + CE2 + alpha / 2 *
    (KL12 + KL21)) / 2`, so `alpha` is the paper's alpha).

    Formula:

    ```
    loss = mean_rows(compiled_loss(y, p))
           + alpha / 4 * mean_pairs(KL(p1 || p2) + KL(p2 || p1))
    ```

    Only the arguments tell a training step: `training=True` and a `y_pred`
    with twice the rows of `x`. Compiled metrics see one copy per example;
    `evaluate` and `predict` run `model` once. `rdrop_divergence` (history)
    is the divergence before `alpha / 4`, averaged over the epoch's examples.

    The divergence goes through `keras.losses.Loss.__call__`: the output's
    Keras mask and `sample_weight` weigh it as they weigh a compiled loss.
    `divergence=None` infers it from the compiled loss (categorical
    crossentropies: `SymmetricKLDivergence(from_logits=...)`; multi-label
    or logits binary crossentropies: `GlobalPointerKLDivergence()`; others
    raise). Otherwise: `"kl"` / `"symmetric_kl"` (`SymmetricKLDivergence(
    from_logits=True)`), `"global_pointer"`, a `keras.losses.Loss` (its
    reduction applies), a function `(a, b) -> value per row`, or a list or
    dict of these, one per output.

    Without targets or compiled loss, the objective is the divergence alone
    (plus `add_loss` terms); `fit(x, sample_weight=w)` and batches `(x,
    None, w)` weigh the examples.

    Args:
        model: the `keras.Model` to train; used as is for inference.
        alpha: weight of the consistency term, a finite number `>= 0`.
        divergence: see above; `None` infers it from the compiled loss.
        **kwargs: passed on to `keras.Model` (e.g. `name`).

    Example:

    ```python
    rdrop = keras_kd.RDrop(model, alpha=4.0)
    rdrop.compile("adam", keras.losses.SparseCategoricalCrossentropy(True))
    rdrop.fit(x, y, epochs=3)  # history: loss, rdrop_divergence
    model.predict(x)           # the trained model, a single pass
    ```

    Reference:
        Liang et al. R-Drop: Regularized Dropout for Neural Networks.
        NeurIPS 2021. https://arxiv.org/abs/2106.14448
    """

    def __init__(self, model, alpha=1.0, divergence=None, **kwargs):
        super().__init__(**kwargs)
        self.model = _checks.model("model", model)
        self.alpha = _checks.non_negative("alpha", alpha)
        self.divergence = divergence
        # Resolved now so that a bad value fails here, not in `fit`.
        self.divergence_losses = None
        if divergence is not None:
            self.divergence_losses = tree.map_structure(_as_loss, divergence)
        self.loss_terms = compat.LossTrackers(
            [keras.metrics.Mean(name="rdrop_divergence")], "rdrop_loss_terms"
        )

    @property
    def divergence_tracker(self):
        """The `keras.metrics.Mean` logged as `rdrop_divergence`."""
        return self.loss_terms.metrics[0]

    def compile(self, optimizer="rmsprop", loss=None, **kwargs):
        # Keras keeps the loss of an earlier compile when recompiled with
        # `loss=None`; divergence-only training must not inherit it.
        self.loss = None
        compat.forget_compiled_loss(self)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        # Keras skips this for models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))
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
        # The trainers hand this output, unchanged, to `compute_loss` and
        # `compute_metrics`: one model invocation feeds all three terms.
        if training:
            return self.model(_repeat_pairs(inputs), training=True)
        return self.model(inputs, training=training)

    def fit(self, x=None, y=None, *args, **kwargs):
        # Keras drops `sample_weight` when `y` is None; zero-width stand-in
        # labels carry the weights to `compute_loss`, which ignores them.
        y, kwargs = carry_weights_without_labels(y, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        """The compiled loss of both copies plus `alpha / 4` times the pair
        divergence (training), or the plain compiled loss (evaluation).

        Raises:
            ValueError: if `y_pred` does not have twice the rows of `x`
                when `training`, or the same rows otherwise.
        """
        _check_rows(*_rows(x, y, y_pred), 2 if training else 1)
        supervised = not _no_labels(y) and self.loss is not None
        if not training and supervised:
            return super().compute_loss(x, y, y_pred, sample_weight, False)
        if not training:
            return _added_losses(self.losses)
        losses = self.divergence_losses
        if losses is None:
            losses = tree.map_structure(_infer_divergence, self.loss)
        divergence = _pair_divergence(losses, y_pred, sample_weight)
        examples = ops.shape(tree.flatten(y_pred)[0])[0] // 2
        self.divergence_tracker.update_state(
            unscale_for_replicas(divergence),
            sample_weight=ops.cast(examples, divergence.dtype),
        )
        total = (self.alpha / 4.0) * divergence
        if not supervised:
            return total + ops.cast(_added_losses(self.losses), total.dtype)
        # Fresh repeated weights: Keras' loss masking scales them in place.
        return total + super().compute_loss(
            x, _repeat_pairs(y), y_pred, _repeat_pairs(sample_weight)
        )

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        rows, examples = _rows(x, y, y_pred)
        single = rows is not None and rows == examples
        if not single:
            _check_rows(rows, examples, 2)
            # Traced TensorFlow steps know no batch size: the stride (2, or
            # 1 in a test step) comes from the run-time shapes.
            count = ops.shape(tree.flatten(x if x is not None else y)[0])[0]
            stride = ops.shape(tree.flatten(y_pred)[0])[0] // count
            index = ops.arange(count) * stride
            y_pred = tree.map_structure(lambda t: ops.take(t, index, 0), y_pred)
        if _no_labels(y):
            logs = self.get_metrics_result()
        else:
            logs = super().compute_metrics(x, y, y_pred, sample_weight)
        if single:  # no pairs: a divergence would be invented
            logs.pop(self.divergence_tracker.name, None)
        return logs

    def evaluate(self, *args, return_dict=False, **kwargs):
        # Traced TensorFlow test steps cannot tell a single pass from a
        # paired one, so they still report the (unused) divergence tracker.
        logs = super().evaluate(*args, return_dict=True, **kwargs)
        logs.pop(self.divergence_tracker.name, None)
        if return_dict:
            return logs
        values = list(logs.values())
        return values[0] if len(values) == 1 else values

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            **super().get_config(),
            "model": serialize(self.model),
            "alpha": self.alpha,
            "divergence": serialize(self.divergence),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        deserialize = keras.saving.deserialize_keras_object
        config["model"] = deserialize(config["model"])
        divergence = config.get("divergence")
        if not isinstance(divergence, str):  # an alias stays a string
            config["divergence"] = deserialize(divergence)
        return cls(**config)


def _added_losses(losses):
    total = [ops.cast(ops.sum(extra), "float32") for extra in losses]
    return sum(total, ops.zeros((), dtype="float32"))


def _pair_divergence(losses, y_pred, sample_weight):
    """The divergence of the pairs of every output, summed."""
    outputs = tree.flatten(y_pred)
    losses = _match_outputs(losses, outputs, "divergence")
    weights = _match_outputs(sample_weight, outputs, "sample_weight")
    total = None
    for output, loss, weight in zip(outputs, losses, weights):
        first, second = _pairs(output)
        value = loss(first, second, _pair_weight(output, weight, loss))
        total = value if total is None else total + value
    return total


def _pair_weight(output, weight, loss):
    """`sample_weight` for the divergence of the pairs of `output`: the user
    weights times the Keras mask of the first copies, scaled as Keras'
    `apply_mask` scales a mask for the loss's reduction."""
    mask = compat.keras_mask(output)
    if mask is None and weight is None:
        return None
    if mask is None:
        # A new tensor per call, the class axis removed: Keras may scale it
        # in place (torch).
        weight = ops.cast(weight, loss.dtype)
        return ops.copy(_to_rank(weight, len(output.shape) - 1))
    mask = ops.cast(_pairs(mask)[0], loss.dtype)
    if loss.reduction in ("mean", "sum_over_batch_size"):
        # Valid entries weigh total / valid: the mean over real tokens.
        total = ops.cast(ops.size(mask), loss.dtype)
        mask = mask * ops.divide_no_nan(total, ops.sum(mask))
    if weight is None:
        return mask
    return mask * _to_rank(ops.cast(weight, loss.dtype), len(mask.shape))


def _as_loss(value):
    """A `keras.losses.Loss` for one `divergence` entry, or a `ValueError`."""
    if isinstance(value, str) and value in DIVERGENCE_ALIASES:
        return DIVERGENCE_ALIASES[value]()
    is_loss = isinstance(value, keras.losses.Loss)
    if is_loss and value.reduction not in (None, "none"):
        return value
    if callable(value) and not (is_loss or isinstance(value, str)):
        return _FunctionDivergence(value)
    raise _checks.invalid(
        "divergence",
        f"None, one of {tuple(DIVERGENCE_ALIASES)}, a `keras.losses.Loss` "
        "that reduces to a scalar or a function `(a, b) -> value` (or a "
        "list/dict of them, one per output)",
        value,
    )


class _FunctionDivergence(keras.losses.Loss):
    """`fn(a, b) -> value per row` as a loss (no public LossFunctionWrapper)."""

    def __init__(self, fn):
        super().__init__(name="rdrop_divergence")
        self.fn = fn

    def call(self, y_true, y_pred):
        return self.fn(y_true, y_pred)


def _rows(x, y, y_pred):
    """Static rows of `y_pred` and of `x` (or `y`); None where unknown."""

    def batch(structure):
        shape = getattr(tree.flatten(structure)[0], "shape", None)
        return None if not shape or shape[0] is None else int(shape[0])

    return batch(y_pred), batch(x if x is not None else y)


def _check_rows(rows, examples, copies):
    # Unknown sizes (traced TensorFlow steps) are left to the run-time ops.
    if None in (rows, examples) or rows == copies * examples:
        return
    raise ValueError(
        f"Invalid value for argument `y_pred`. Expected {copies * examples} "
        f"rows for {examples} examples (each {('once', 'twice')[copies - 1]}"
        f", as `rdrop(x, training={copies == 2})` returns them). Received: "
        f"y_pred with {rows} rows"
    )


def _no_labels(y):
    # `RDrop.fit` stands in zero-width labels for missing ones.
    return y is None or is_placeholder(y)


def _repeat_pairs(structure):
    """`[a, b, ...] -> [a, a, b, b, ...]` along axis 0 of every tensor."""
    return tree.map_structure(
        lambda t: None if t is None else ops.repeat(t, 2, axis=0), structure
    )


def _match_outputs(value, outputs, name):
    """One entry of `value` per output: shared, or a matching structure."""
    if value is None or not isinstance(value, (dict, list, tuple)):
        return [value] * len(outputs)
    flat = tree.flatten(value)
    if len(flat) in (1, len(outputs)):
        return flat * (len(outputs) // len(flat))
    raise ValueError(
        f"Invalid value for argument `{name}`. Expected one entry or one per "
        f"model output ({len(outputs)}). Received: {name}={value}"
    )


def _pairs(x):
    """The first and second copies of an interleaved batch (a reshape: on
    TensorFlow strided slices of a GlobalPointer grid cost like the loss)."""
    pairs = ops.reshape(x, (-1, 2, *ops.shape(x)[1:]))
    first, second = ops.unstack(pairs, num=2, axis=1)
    return first, second


def _to_rank(x, rank):
    """`x` squeezed or expanded at the end to broadcast against `rank`."""
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
    loss_object = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(loss_object, _MULTILABEL):
        return kd_losses.GlobalPointerKLDivergence()
    from_logits = getattr(loss_object, "from_logits", None)
    if from_logits is None and inspect.isfunction(loss_object):
        # A Keras loss function given by name: its default applies.
        parameters = inspect.signature(loss_object).parameters
        from_logits = getattr(parameters.get("from_logits"), "default", None)
    fn = getattr(loss_object, "fn", loss_object)
    binary = "binary" in getattr(fn, "__name__", type(fn).__name__).lower()
    if isinstance(from_logits, bool) and not binary:
        return kd_losses.SymmetricKLDivergence(from_logits=from_logits)
    if from_logits is True and binary:
        return kd_losses.GlobalPointerKLDivergence(axis=-1)
    raise ValueError(
        "Invalid value for argument `divergence`. It cannot be inferred "
        "from the compiled loss (logits or probabilities?); pass it, e.g. "
        "`keras_kd.losses.SymmetricKLDivergence(from_logits=True)` for "
        "softmax logits or `keras_kd.losses.GlobalPointerKLDivergence()` for "
        f"multi-label logits. Received: divergence=None, loss={loss}"
    )
