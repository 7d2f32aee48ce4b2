"""Saving and reloading a Distiller and its student."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
from _distiller_models import (
    assert_weights_equal,
    data,
    pair,
    sparse_ce,
    weights_of,
)

import keras_kd
from keras_kd import losses


def trained_distiller(temperature=3.0, alpha=0.25):
    teacher, student = pair(batch_norm=True)
    x, y = data(32)
    distiller = keras_kd.Distiller(student, teacher, name="kd")
    distiller.compile(
        keras.optimizers.Adam(0.01),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=temperature),
        alpha=alpha,
        metrics=["sparse_categorical_accuracy"],
    )
    distiller.fit(x, y, batch_size=8, verbose=0)
    return distiller, x, y


def test_config_round_trip():
    distiller, x, _ = trained_distiller()
    config = keras.saving.serialize_keras_object(distiller)
    assert config["registered_name"] == "keras_kd>Distiller"
    clone = keras.saving.deserialize_keras_object(config)
    assert isinstance(clone, keras_kd.Distiller)
    assert clone.name == "kd"
    assert clone.student.name == "student"
    assert clone.teacher.name == "teacher"
    assert clone.student is not distiller.student
    assert [w.shape for w in clone.weights] == [
        w.shape for w in distiller.weights
    ]


def test_whole_distiller_save_and_load(tmp_path):
    distiller, x, y = trained_distiller(temperature=3.0, alpha=0.25)
    distiller.alpha.assign(0.4)  # as a scheduler would have left it
    path = str(tmp_path / "distiller.keras")
    distiller.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, keras_kd.Distiller)
    assert loaded.compiled
    assert isinstance(loaded.distillation_loss, losses.KLDivergence)
    assert loaded.distillation_loss.temperature is loaded.temperature
    np.testing.assert_allclose(float(loaded.temperature), 3.0)
    np.testing.assert_allclose(float(loaded.alpha), 0.4)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )
    expected = distiller.evaluate(x, y, verbose=0, return_dict=True)
    logs = loaded.evaluate(x, y, verbose=0, return_dict=True)
    assert set(logs) == set(expected)
    for key in expected:
        np.testing.assert_allclose(logs[key], expected[key], rtol=1e-5)
    # The optimizer state came back too: one more identical step on both
    # gives the same weights.
    distiller.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=32, shuffle=False, verbose=0)
    assert_weights_equal(
        weights_of(loaded.student), weights_of(distiller.student), atol=1e-5
    )


def test_weights_round_trip(tmp_path):
    distiller, x, _ = trained_distiller()
    path = str(tmp_path / "distiller.weights.h5")
    distiller.save_weights(path)
    teacher, student = pair(batch_norm=True)
    other = keras_kd.Distiller(student, teacher)
    other.load_weights(path)
    assert_weights_equal(weights_of(other), weights_of(distiller))
    np.testing.assert_array_equal(
        other.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )


def test_student_reloads_without_keras_kd(tmp_path):
    distiller, x, _ = trained_distiller()
    path = tmp_path / "student.keras"
    distiller.student.save(str(path))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", distiller.predict(x, verbose=0))
    script = textwrap.dedent(
        f"""
        import sys
        import numpy as np
        import keras
        model = keras.models.load_model({str(path)!r})
        x = np.load({str(tmp_path / "x.npy")!r})
        expected = np.load({str(tmp_path / "expected.npy")!r})
        np.testing.assert_allclose(
            model.predict(x, verbose=0), expected, atol=1e-6
        )
        assert not any(m.startswith("keras_kd") for m in sys.modules)
        print("reloaded", type(model).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reloaded Functional" in result.stdout
