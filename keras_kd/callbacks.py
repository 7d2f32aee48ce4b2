"""Callbacks that schedule the Distiller's `alpha` and temperature.

Both work like `keras.callbacks.LearningRateScheduler`: at the start of
every epoch they call `schedule(epoch)` or `schedule(epoch, current_value)`
and assign the result to a `keras.Variable` of the Distiller, which compiled
train functions read on every step (a Python float would be frozen into the
compiled function when it is traced). The value in use is added to the
epoch's logs, so it appears in `History` and `CSVLogger` files.

Like Keras' own callbacks they are not serializable objects (a schedule is
an arbitrary function), so they are not registered with `keras.saving`.
"""

import inspect

import keras
from keras import ops

from keras_kd import _checks


def _takes_current_value(schedule):
    try:
        parameters = inspect.signature(schedule).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = 0
    for p in parameters:
        if p.kind == p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


class _ScalarScheduler(keras.callbacks.Callback):
    """Assigns `schedule(epoch[, current])` to a Distiller variable."""

    _name = None

    def __init__(self, schedule, verbose=0):
        super().__init__()
        if not callable(schedule):
            raise ValueError(
                "Invalid value for argument `schedule`. Expected a function "
                f"of the epoch. Received: schedule={schedule!r}"
            )
        self.schedule = schedule
        self.verbose = verbose
        self._pass_current = _takes_current_value(schedule)

    def _variable(self):
        variable = getattr(self.model, self._name, None)
        if not isinstance(variable, keras.Variable):
            raise ValueError(
                f"`{type(self).__name__}` needs a `keras_kd.Distiller` "
                f"model, which holds `{self._name}` as a `keras.Variable`. "
                f"Received: model of type {type(self.model).__name__}"
            )
        return variable

    def _validate(self, value):
        raise NotImplementedError

    def on_train_begin(self, logs=None):
        self._variable()

    def on_epoch_begin(self, epoch, logs=None):
        variable = self._variable()
        if self._pass_current:
            current = float(ops.convert_to_numpy(variable))
            value = self.schedule(epoch, current)
        else:
            value = self.schedule(epoch)
        try:
            value = float(ops.convert_to_numpy(value))
        except (TypeError, ValueError):
            pass
        value = self._validate(value)
        variable.assign(value)
        if self.verbose > 0:
            print(
                f"\nEpoch {epoch + 1}: {type(self).__name__} setting "
                f"{self._name} to {value}."
            )

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs[self._name] = float(ops.convert_to_numpy(self._variable()))


class AlphaScheduler(_ScalarScheduler):
    """Sets the Distiller's `alpha` at the start of every epoch.

    `alpha` weights the hard-label loss, `1 - alpha` the distillation loss.
    A common schedule starts from pure distillation and lets the labels in
    later.

    Args:
        schedule: `schedule(epoch)` or `schedule(epoch, alpha)` returning the
            new `alpha` in `[0, 1]` (`epoch` counts from 0).
        verbose: `0` quiet, `1` prints each update.

    Example:

    ```python
    scheduler = keras_kd.callbacks.AlphaScheduler(
        lambda epoch: min(0.5, 0.1 * epoch)
    )
    distiller.fit(x, y, epochs=10, callbacks=[scheduler])
    ```
    """

    _name = "alpha"

    def _validate(self, value):
        return _checks.fraction("alpha", value)


class TemperatureScheduler(_ScalarScheduler):
    """Sets the distillation temperature at the start of every epoch.

    The Distiller's distillation loss must have a `temperature` (all
    keras-kd divergences do); its `T**2` factor follows the new value.

    Args:
        schedule: `schedule(epoch)` or `schedule(epoch, temperature)`
            returning a finite temperature `> 0` (`epoch` counts from 0).
        verbose: `0` quiet, `1` prints each update.

    Example:

    ```python
    # anneal from T = 8 to T = 1 over 8 epochs
    scheduler = keras_kd.callbacks.TemperatureScheduler(
        lambda epoch: max(1.0, 8.0 - epoch)
    )
    ```
    """

    _name = "temperature"

    def _validate(self, value):
        return _checks.temperature(value)

    def on_train_begin(self, logs=None):
        variable = self._variable()
        loss = getattr(self.model, "distillation_loss", None)
        if getattr(loss, "temperature", None) is not variable:
            raise ValueError(
                "`TemperatureScheduler` needs a distillation loss with a "
                "`temperature`, such as `keras_kd.losses.KLDivergence`. "
                f"Received: distillation_loss={loss!r}"
            )
