"""What every keras-kd loss shares: argument checks and config."""

import keras
from keras import ops

from keras_kd import ops as kd_ops


class DivergenceLoss(keras.losses.Loss):
    """Base of the losses that compare a target and a prediction.

    Subclasses set `fn`, a function of `ops`, and list in `_fn_args` the
    constructor arguments that are passed on to it (and saved in the config).
    `temperature` may be a Python number or a scalar `keras.Variable`, which
    lets a callback change it inside compiled train functions.
    """

    _fn_args = ()

    def __init__(self, reduction, name, dtype, **fn_kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if "temperature" in fn_kwargs:
            fn_kwargs["temperature"] = kd_ops.validate_temperature(
                fn_kwargs["temperature"]
            )
        for key, value in fn_kwargs.items():
            setattr(self, key, value)

    def call(self, y_true, y_pred):
        kwargs = {key: getattr(self, key) for key in self._fn_args}
        return type(self).fn(y_true, y_pred, **kwargs)

    def get_config(self):
        config = super().get_config()
        config["dtype"] = self._dtype_policy.name
        for key in self._fn_args:
            value = getattr(self, key)
            if isinstance(value, keras.Variable):
                value = float(ops.convert_to_numpy(value))
            config[key] = value
        return config
