"""Schedules of alpha and temperature, and Keras callbacks on a Distiller."""

import csv
import os

import keras
import numpy as np
import pytest
from _cases import kl64, sparse_ce64
from _distiller_models import (
    assert_weights_equal,
    data,
    pair,
    sparse_ce,
    weights_of,
)

import keras_kd
from keras_kd import callbacks, losses


def make_distiller(learning_rate=0.0, temperature=1.0, alpha=0.5, **compile):
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        keras.optimizers.SGD(learning_rate),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=temperature),
        alpha=alpha,
        **compile,
    )
    return distiller


def test_temperature_follows_schedule_inside_compiled_steps():
    distiller = make_distiller(temperature=5.0)
    x, y = data(16)
    temperatures = [1.0, 2.0, 4.0]
    scheduler = callbacks.TemperatureScheduler(lambda e: temperatures[e])
    history = distiller.fit(
        x, y, batch_size=8, epochs=3, callbacks=[scheduler], verbose=0
    )
    t = distiller.teacher.predict(x, verbose=0)
    s = distiller.student.predict(x, verbose=0)
    expected = [kl64(t, s, temp).mean() for temp in temperatures]
    np.testing.assert_allclose(
        history.history["distillation_loss"], expected, rtol=1e-5
    )
    assert history.history["temperature"] == temperatures
    assert float(distiller.temperature) == 4.0


def test_alpha_follows_schedule_with_current_value():
    distiller = make_distiller(alpha=0.8)
    x, y = data(16)
    seen = []

    def halve(epoch, alpha):
        seen.append(alpha)
        return alpha / 2

    history = distiller.fit(
        x,
        y,
        batch_size=16,
        epochs=3,
        callbacks=[callbacks.AlphaScheduler(halve)],
        verbose=0,
    )
    np.testing.assert_allclose(seen, [0.8, 0.4, 0.2], rtol=1e-6)
    alphas = np.array([0.4, 0.2, 0.1])
    np.testing.assert_allclose(history.history["alpha"], alphas, rtol=1e-6)
    t = distiller.teacher.predict(x, verbose=0)
    s = distiller.student.predict(x, verbose=0)
    hard, soft = sparse_ce64(y, s).mean(), kl64(t, s).mean()
    np.testing.assert_allclose(
        history.history["loss"],
        alphas * hard + (1 - alphas) * soft,
        rtol=1e-5,
    )


def test_scheduler_errors():
    x, y = data(8)
    bad = callbacks.AlphaScheduler(lambda epoch: 1.5)
    with pytest.raises(ValueError, match="`alpha`"):
        make_distiller().fit(x, y, callbacks=[bad], verbose=0)
    bad = callbacks.TemperatureScheduler(lambda epoch: 0.0)
    with pytest.raises(ValueError, match="`temperature`"):
        make_distiller().fit(x, y, callbacks=[bad], verbose=0)
    teacher, student = pair()
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile("sgd", distillation_loss=keras.losses.MeanSquaredError())
    scheduler = callbacks.TemperatureScheduler(lambda epoch: 2.0)
    with pytest.raises(ValueError, match="distillation loss with a"):
        distiller.fit(x, y, callbacks=[scheduler], verbose=0)
    student.compile("sgd", loss=sparse_ce())
    with pytest.raises(ValueError, match="keras_kd.Distiller"):
        student.fit(x, y, callbacks=[scheduler], verbose=0)
    with pytest.raises(ValueError, match="`schedule`"):
        callbacks.AlphaScheduler(0.5)


def test_model_checkpoint_weights_and_whole_model(tmp_path):
    distiller = make_distiller(learning_rate=0.1)
    x, y = data(32)
    weights_path = str(tmp_path / "best.weights.h5")
    model_path = str(tmp_path / "last.keras")
    distiller.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=2,
        batch_size=8,
        verbose=0,
        callbacks=[
            keras.callbacks.ModelCheckpoint(
                weights_path,
                monitor="val_distillation_loss",
                save_best_only=True,
                save_weights_only=True,
            ),
            keras.callbacks.ModelCheckpoint(model_path),
        ],
    )
    loaded = keras.models.load_model(model_path)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), distiller.predict(x, verbose=0)
    )
    other = make_distiller()
    other.load_weights(weights_path)
    assert os.path.exists(weights_path)
    assert len(other.get_weights()) == len(distiller.get_weights())


@pytest.mark.parametrize(
    "monitor", ["val_distillation_loss", "val_student_loss"]
)
def test_early_stopping_and_reduce_lr_in_default_mode(monitor):
    # With a learning rate of 0 nothing improves after the first epoch.
    distiller = make_distiller(learning_rate=0.0)
    x, y = data(16)
    history = distiller.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=10,
        batch_size=16,
        verbose=0,
        callbacks=[
            keras.callbacks.ReduceLROnPlateau(monitor, patience=0, factor=0.5),
            keras.callbacks.EarlyStopping(monitor, patience=2),
        ],
    )
    assert len(history.history["loss"]) == 3
    assert history.history["learning_rate"] == [0.0, 0.0, 0.0]


def test_reduce_lr_on_plateau_lowers_the_rate():
    distiller = make_distiller(learning_rate=1e-12)
    x, y = data(16)
    history = distiller.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=3,
        batch_size=16,
        verbose=0,
        callbacks=[
            keras.callbacks.ReduceLROnPlateau(
                "val_student_loss", patience=0, factor=0.5, min_delta=1e-3
            )
        ],
    )
    # Logged before the callback lowers it at the end of the epoch.
    rates = history.history["learning_rate"]
    np.testing.assert_allclose(rates, [1e-12, 1e-12, 5e-13], rtol=1e-5)
    np.testing.assert_allclose(
        float(distiller.optimizer.learning_rate), 2.5e-13, rtol=1e-5
    )


class Interrupt(keras.callbacks.Callback):
    def __init__(self, at_epoch):
        super().__init__()
        self.at_epoch = at_epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at_epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_to_same_weights(tmp_path):
    x, y = data(32)
    schedule = callbacks.AlphaScheduler(lambda epoch: 0.1 * epoch)

    def run(extra, backup_dir=None):
        keras.utils.set_random_seed(7)
        distiller = make_distiller(learning_rate=0.1)
        cbs = [schedule] + extra
        if backup_dir:
            cbs.append(keras.callbacks.BackupAndRestore(backup_dir))
        distiller.fit(
            x,
            y,
            epochs=4,
            batch_size=8,
            shuffle=False,
            verbose=0,
            callbacks=cbs,
        )
        return distiller

    reference = weights_of(run([]))
    backup = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="interrupted"):
        run([Interrupt(2)], backup)
    resumed = run([], backup)
    assert_weights_equal(weights_of(resumed), reference, atol=1e-6)
    np.testing.assert_allclose(float(resumed.alpha), 0.3, rtol=1e-6)


def test_csv_logger_and_terminate_on_nan(tmp_path):
    distiller = make_distiller(learning_rate=0.1)
    x, y = data(32)
    path = str(tmp_path / "log.csv")
    distiller.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=2,
        batch_size=8,
        verbose=0,
        # Schedulers add their value to the epoch logs, so they come
        # before the loggers that read them.
        callbacks=[
            callbacks.TemperatureScheduler(lambda epoch: 2.0 + epoch),
            keras.callbacks.CSVLogger(path),
        ],
    )
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for key in ("loss", "student_loss", "distillation_loss"):
        assert key in rows[0] and "val_" + key in rows[0]
    assert [float(r["temperature"]) for r in rows] == [2.0, 3.0]

    weights = np.ones(len(x), "float32")
    weights[8:] = np.nan
    history = distiller.fit(
        x,
        y,
        sample_weight=weights,
        epochs=3,
        batch_size=8,
        shuffle=False,
        verbose=0,
        callbacks=[keras.callbacks.TerminateOnNaN()],
    )
    assert len(history.history["loss"]) == 1
    assert np.isnan(history.history["loss"][0])


def test_tensorboard_writes_distillation_scalars(tmp_path):
    # Keras' TensorBoard callback writes through `tf.summary`, which needs
    # the `tensorboard` package on every backend.
    pytest.importorskip("tensorflow")
    pytest.importorskip("tensorboard")
    distiller = make_distiller(learning_rate=0.1)
    x, y = data(16)
    log_dir = str(tmp_path / "tb")
    distiller.fit(
        x,
        y,
        validation_data=(x, y),
        epochs=1,
        batch_size=8,
        verbose=0,
        callbacks=[keras.callbacks.TensorBoard(log_dir, write_graph=False)],
    )
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(log_dir)
        for name in names
    ]
    assert any("train" in f for f in files)
    assert any("validation" in f for f in files)
    contents = b"".join(open(f, "rb").read() for f in files)
    assert b"epoch_distillation_loss" in contents
    assert b"epoch_student_loss" in contents
