"""Every use of a private Keras name in keras-kd, and nothing else.

Public Keras has no route for the few things below. Each is imported or
touched here only, and the test suite checks each one on the installed
Keras, so an upgrade that moves or renames one fails the suite
loudly instead of changing keras-kd's behaviour silently.
"""

import keras

# The Keras mask of a tensor (set by `Embedding(mask_zero=True)`,
# `Masking`, ...). JAX arrays cannot carry attributes, so Keras keeps their
# masks in a side table that only this accessor reads; reading the
# `_keras_mask` attribute instead would miss every mask on JAX.
from keras.src.backend import get_keras_mask as _get_keras_mask

# Keras' monitoring callbacks (`EarlyStopping`, `ReduceLROnPlateau`, ...)
# infer `mode="auto"` only for metrics held in this container whose
# `_direction` they can read.
from keras.src.trainers.compile_utils import MetricsList as _MetricsList


def keras_mask(x):
    """The Keras mask carried by tensor `x`, or `None`."""
    return _get_keras_mask(x)


class LossTrackers(_MetricsList):
    """Loss-term trackers (`keras.metrics.Mean`) shown as one metric.

    Listed in `model.metrics`, its trackers appear in the logs under their
    own names, and `EarlyStopping("val_distillation_loss")` infers that
    lower is better without `mode="min"`.
    """

    def __init__(self, trackers, name="loss_terms"):
        keras.metrics.Metric.__init__(self, name=name)
        self.metrics = list(trackers)
        self.output_name = None
        for tracker in self.metrics:
            tracker._direction = "down"

    def update_state(self, *args, **kwargs):
        raise NotImplementedError(
            "Loss-term trackers are updated by the model's `compute_loss`."
        )

    def reset_state(self):
        for metric in self.metrics:
            metric.reset_state()

    def result(self):
        return {metric.name: metric.result() for metric in self.metrics}


def forget_compiled_loss(model):
    """Drops the compiled loss of an earlier `compile`.

    `Model.compile(loss=None)` keeps the loss of a previous `compile` in
    place; a model that means "no loss" by `None` (pure distillation,
    R-Drop without labels) must not inherit it.
    """
    model._compile_loss = None
    model.loss = None


def loss_function_arguments(loss):
    """The keyword arguments a Keras function-wrapping loss
    (`keras.losses.SparseCategoricalCrossentropy`, ...) passes to its
    function, `axis` included, which `get_config` leaves out."""
    return dict(loss._fn_kwargs)
