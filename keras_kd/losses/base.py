"""What every keras-kd loss shares: argument checks, config and the empty
batch."""

import keras
from keras import ops

from keras_kd import _checks
from keras_kd.ops._gradients import resolve_precise


class DivergenceLoss(keras.losses.Loss):
    """Base of the losses that compare a target and a prediction.

    Subclasses set `fn`, a function of `ops`, and list in `_fn_args` the
    constructor arguments that are passed on to it (and saved in the config).
    `temperature` may be a Python or NumPy number or a scalar
    `keras.Variable` (its current value is checked here), which lets a
    callback change it inside compiled train functions.

    `divergence` names the softmax divergence a loss computes, by the name
    the fused ops take (`"kl"`, `"reverse_kl"`, `"symmetric_kl"`, `"jsd"`),
    or is `None`. The distillers' fused paths read it to compute the same
    loss without calling the class. A subclass that sets its own `fn` or
    `call` without naming a divergence names none, so a fused path never
    computes a loss the class does not.
    """

    _fn_args = ()
    divergence = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__
        if "divergence" not in own and ("fn" in own or "call" in own):
            cls.divergence = None

    def __init__(self, reduction, name, dtype, **fn_kwargs):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if "temperature" in fn_kwargs:
            fn_kwargs["temperature"] = _checks.temperature(
                fn_kwargs["temperature"]
            )
        if "precise" in fn_kwargs:
            # Checked now, kept as given: `None` is resolved per backend
            # when the loss runs, and a saved config stays portable.
            resolve_precise(fn_kwargs["precise"])
            precise = fn_kwargs["precise"]
            fn_kwargs["precise"] = None if precise is None else bool(precise)
        for key, value in fn_kwargs.items():
            setattr(self, key, value)

    def __call__(self, y_true, y_pred, sample_weight=None):
        value = super().__call__(y_true, y_pred, sample_weight)
        # Keras hands back per-example values of shape [0] unreduced for an
        # empty batch; a reduced loss is a scalar, and 0 is its value there
        # (the sum over nothing, and what Keras gives for rank-3 inputs).
        if self.reduction not in (None, "none") and tuple(value.shape) == (0,):
            value = ops.sum(value)
        return value

    def call(self, y_true, y_pred):
        kwargs = {key: getattr(self, key) for key in self._fn_args}
        return type(self).fn(y_true, y_pred, **kwargs)

    def get_config(self):
        config = super().get_config()
        # `keras.losses.Loss.get_config` (Keras 3.15) leaves the dtype out;
        # the public `dtype` property is the compute dtype, all a loss uses.
        config.setdefault("dtype", self.dtype)
        for key in self._fn_args:
            value = getattr(self, key)
            if isinstance(value, keras.Variable):
                value = float(ops.convert_to_numpy(value))
            config[key] = value
        return config
