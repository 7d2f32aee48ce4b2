"""The one decorator that makes a public class part of keras-kd."""

import keras

PACKAGE = "keras_kd"


def export(cls):
    """Registers `cls` for Keras serialization under the `keras_kd` package.

    Saved `.keras` files then name the class `keras_kd>ClassName` and reload
    with `keras.models.load_model` as long as `keras_kd` is imported.
    """
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)
