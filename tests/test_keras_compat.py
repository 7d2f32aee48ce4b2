"""Each private Keras name keras-kd uses (all in `keras_kd/_keras_compat.py`)
still does what keras-kd relies on. A Keras upgrade that breaks one fails
here, by name, before it changes any result silently."""

import pathlib
import re

import keras
import numpy as np
from _distiller_models import data, pair, sparse_ce

import keras_kd
from keras_kd import _keras_compat

PRIVATE = re.compile(
    r"keras\.src|\._(compile_loss|compile_config|flatten_layers|"
    r"get_own_losses|trainable_variables|keras_mask|dtype_policy|"
    r"direction|fn_kwargs)\b"
)


def test_no_private_keras_name_outside_the_compat_module():
    package = pathlib.Path(keras_kd.__file__).parent
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in sorted(package.rglob("*.py"))
        if path.name != "_keras_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert offenders == []


def test_keras_mask_is_read_on_every_backend():
    tokens = np.array([[3, 1, 0, 0], [2, 0, 0, 0]], "int32")
    embedded = keras.layers.Embedding(5, 2, mask_zero=True)(tokens)
    mask = _keras_compat.keras_mask(embedded)
    assert mask is not None
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(mask), tokens > 0)
    assert _keras_compat.keras_mask(keras.ops.ones((2, 3))) is None


def test_loss_trackers_are_logged_and_let_early_stopping_infer_min():
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", loss=sparse_ce())
    x, y = data(16)
    stop = keras.callbacks.EarlyStopping("val_distillation_loss", patience=5)
    history = distiller.fit(
        x, y, validation_data=(x, y), epochs=2, verbose=0, callbacks=[stop]
    ).history
    assert {"student_loss", "distillation_loss"} <= set(history)
    assert stop.monitor_op is keras.ops.less


def test_forget_compiled_loss_drops_an_earlier_loss():
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    x, y = data(16)
    distiller.compile(keras.optimizers.SGD(0.0), loss=sparse_ce())
    distiller.compile(keras.optimizers.SGD(0.0), loss=None)
    assert distiller.loss is None
    history = distiller.fit(x, y, batch_size=16, verbose=0).history
    assert "student_loss" not in history
    np.testing.assert_allclose(
        history["loss"], history["distillation_loss"], rtol=1e-6
    )


def test_loss_function_arguments_name_the_axis_and_the_flags():
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=3, axis=1
    )
    found = _keras_compat.loss_function_arguments(loss)
    assert found["axis"] == 1
    assert found["from_logits"] is True
    assert found["ignore_class"] == 3
    default = keras.losses.SparseCategoricalCrossentropy()
    assert _keras_compat.loss_function_arguments(default)["axis"] == -1
