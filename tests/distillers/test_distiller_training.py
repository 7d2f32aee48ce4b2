"""Compilation modes, mixed precision, distribution, and the digits task."""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from _distiller_models import data, pair, sparse_ce, weights_of
from conftest import BACKEND

import keras_kd
from keras_kd import losses

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(epochs=2, **compile_kwargs):
    keras.utils.set_random_seed(3)
    teacher, student = pair(batch_norm=True)
    x, y = data(32)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        keras.optimizers.SGD(0.1),
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.3,
        **compile_kwargs,
    )
    history = distiller.fit(
        x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0
    )
    return weights_of(student), history.history


def assert_close(a, b, atol):
    for u, v in zip(a, b):
        np.testing.assert_allclose(u, v, atol=atol, rtol=0)


@pytest.mark.skipif(
    BACKEND == "torch" and not os.environ.get("KERAS_KD_TORCH_COMPILE"),
    reason="torch.compile takes minutes on a small CPU; set "
    "KERAS_KD_TORCH_COMPILE=1 to run it (Keras runs one step per call on "
    "PyTorch, so steps_per_execution does not apply)",
)
def test_jit_compile_and_steps_per_execution_agree_with_default():
    default, _ = train()
    compiled, history = train(jit_compile=True)
    assert_close(compiled, default, atol=1e-5)
    assert np.isfinite(history["distillation_loss"]).all()
    if BACKEND != "torch":
        batched, _ = train(steps_per_execution=3)
        assert_close(batched, default, atol=1e-6)


@pytest.fixture
def policy():
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_loss_terms_in_float32(policy, name):
    policy(name)
    teacher, student = pair()
    x, y = data(16)
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        "adam",
        loss=sparse_ce(),
        distillation_loss=losses.KLDivergence(temperature=4.0),
    )
    history = distiller.fit(x, y, batch_size=8, verbose=0)
    for key in ("loss", "student_loss", "distillation_loss"):
        assert np.isfinite(history.history[key]).all()
    outputs = distiller(x)
    assert keras.backend.standardize_dtype(outputs.dtype) == name[6:]
    teacher_out = distiller.teacher_predictions(x)
    terms = [
        distiller.compute_distillation_loss(x, y, outputs, teacher_out),
        distiller.compute_student_loss(x, y, outputs),
    ]
    for term in terms:
        assert keras.backend.standardize_dtype(term.dtype) == "float32"
    if name == "mixed_float16":
        assert isinstance(
            distiller.optimizer, keras.optimizers.LossScaleOptimizer
        )


# Each script trains the same seeded distiller on one device and on several
# and prints the largest weight difference; the device count must be fixed
# before the backend starts, hence a fresh interpreter.
_COMMON = """
import sys
sys.path.insert(0, {tests!r})
import keras
import numpy as np
from _distiller_models import data, pair, sparse_ce, weights_of
import keras_kd

def train(start=None):
    # No BatchNormalization in the student: tf.distribute normalizes each
    # replica's share of the batch separately.
    teacher, student = pair()
    if start is None:
        start = teacher.get_weights(), student.get_weights()
    teacher.set_weights(start[0])
    student.set_weights(start[1])
    distiller = keras_kd.Distiller(student, teacher)
    distiller.compile(
        keras.optimizers.SGD(0.1),
        loss=sparse_ce(),
        distillation_loss=keras_kd.losses.KLDivergence(temperature=2.0),
        alpha=0.3,
    )
    x, y = data(32)
    history = distiller.fit(
        x, y, batch_size=16, epochs=1, shuffle=False, verbose=0
    )
    return weights_of(student), history.history, start
"""

_JAX = """
import jax
assert len(jax.devices()) == 4, jax.devices()
single, logs, start = train()
keras.distribution.set_distribution(
    keras.distribution.DataParallel(devices=jax.devices())
)
multi, multi_logs, _ = train(start)
"""

_TENSORFLOW = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)
single, logs, start = train()
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    multi, multi_logs, _ = train(start)
"""

_REPORT = """
diff = max(float(np.abs(a - b).max()) for a, b in zip(single, multi))
np.testing.assert_allclose(
    multi_logs["distillation_loss"], logs["distillation_loss"], rtol=1e-4
)
np.testing.assert_allclose(
    multi_logs["student_loss"], logs["student_loss"], rtol=1e-4
)
print("max weight difference", diff)
"""


def run_script(body, **env):
    script = textwrap.dedent(_COMMON.format(tests=TESTS_DIR) + body + _REPORT)
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **env),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.split("max weight difference")[-1])


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution on JAX")
def test_jax_data_parallel_matches_single_device():
    # Four virtual CPU devices, also on a machine with an accelerator.
    diff = run_script(
        _JAX,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
    )
    assert diff < 1e-5


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute")
def test_tensorflow_mirrored_strategy_matches_single_device():
    diff = run_script(_TENSORFLOW)
    assert diff < 1e-5


def digits_mlp(hidden, dropout=0.0):
    inputs = keras.Input((64,))
    h = keras.layers.Dense(hidden, activation="relu")(inputs)
    if dropout:
        h = keras.layers.Dropout(dropout)(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


@pytest.fixture
def one_torch_thread():
    # Tiny models gain nothing from intra-op threads, and on a busy machine
    # PyTorch's spinning worker threads slow each step down tenfold.
    if BACKEND != "torch":
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_distilled_student_beats_scratch_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = (x[order] / 16.0).astype("float32"), y[order].astype("int32")
    x_test, y_test = x[1000:], y[1000:]
    # The teacher learned from 1000 labelled digits; both students get the
    # same 200 of them, the distilled one with the teacher's soft targets.
    teacher = digits_mlp(128, dropout=0.2)
    teacher.compile(keras.optimizers.Adam(3e-3), loss=sparse_ce())
    teacher.fit(
        np.tile(x[:1000], (6, 1)),
        np.tile(y[:1000], 6),
        batch_size=100,
        epochs=5,
        verbose=0,
    )
    # Six copies per epoch: the same steps as 60 epochs, fewer epoch ends.
    x_train, y_train = np.tile(x[:200], (6, 1)), np.tile(y[:200], 6)

    def accuracy(model):
        # A numpy forward pass: no predict function to compile per model.
        w1, b1, w2, b2 = model.get_weights()
        logits = np.maximum(x_test @ w1 + b1, 0.0) @ w2 + b2
        return np.mean(np.argmax(logits, -1) == y_test)

    scratch, distilled = [], []
    for seed in range(3):
        keras.utils.set_random_seed(seed)
        student = digits_mlp(16)
        start = student.get_weights()
        student.compile(keras.optimizers.Adam(1e-2), loss=sparse_ce())
        student.fit(x_train, y_train, epochs=10, batch_size=50, verbose=0)
        scratch.append(accuracy(student))

        student = digits_mlp(16)
        student.set_weights(start)
        distiller = keras_kd.Distiller(student, teacher)
        distiller.compile(
            keras.optimizers.Adam(1e-2),
            loss=sparse_ce(),
            distillation_loss=losses.KLDivergence(temperature=4.0),
            alpha=0.1,
        )
        distiller.fit(x_train, y_train, epochs=10, batch_size=50, verbose=0)
        distilled.append(accuracy(distiller.student))
    scratch, distilled = np.array(scratch), np.array(distilled)
    print("scratch", scratch, "distilled", distilled)
    assert distilled.mean() > scratch.mean() + 0.01, (scratch, distilled)
    assert np.sum(distilled > scratch) >= 2, (scratch, distilled)
