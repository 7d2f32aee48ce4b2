"""The closed-form gradients of `keras_kd.ops` (issue 10, item 1): equal to
float64 finite differences of the float64 references, with respect to the
student and the teacher, on both paths; the same under `jax.jit`,
`tf.function(jit_compile=True)` and in `model.fit`; and second-order
gradients as documented in `keras_kd/ops/_gradients.py`."""

import contextlib

import keras
import numpy as np
import pytest
from _cases import (
    dkd64,
    f32,
    global_pointer64,
    jsd64,
    kl64,
    mlce64,
    symmetric_kl64,
)
from _cases_keras import (
    BACKEND,
    backend_grad,
    np_,
)
from scipy import special

from keras_kd import losses
from keras_kd import ops as kd
from keras_kd.ops import _softmax_driver

PATHS = [True, False]
LABELS = np.array([0, 3, 6, 1, 2, 5])


def _inputs(seed=0, rows=6, classes=7, scale=2.0):
    rng = np.random.default_rng(seed)
    t = scale * rng.normal(size=(rows, classes))
    s = scale * rng.normal(size=(rows, classes))
    return t, s


def _rdrop64_rows(labels, logits, alpha):
    """The R-Drop loss summed over rows, sparse labels, float64."""
    lq = special.log_softmax(np.asarray(logits, np.float64), axis=-1)
    ce = -lq[np.arange(len(labels)), labels]
    a, b = lq[0::2], lq[1::2]
    pair = ((np.exp(a) - np.exp(b)) * (a - b)).sum(-1)
    return ce.sum() + alpha / 4.0 * 2.0 * pair.sum()


# name: (keras-kd function of (t, s, precise), float64 reference of (t, s)
#        summed, whether the teacher gets a gradient)
FUNCTIONS = {
    "kl": (
        lambda t, s, p: kd.kl_divergence(t, s, temperature=2.5, precise=p),
        lambda t, s: kl64(t, s, 2.5).sum(),
    ),
    "reverse_kl": (
        lambda t, s, p: kd.kl_divergence(s, t, temperature=0.7, precise=p),
        lambda t, s: kl64(s, t, 0.7).sum(),
    ),
    "symmetric_kl": (
        lambda t, s, p: kd.symmetric_kl_divergence(
            t, s, temperature=2.0, precise=p
        ),
        lambda t, s: symmetric_kl64(t, s, 2.0).sum(),
    ),
    "jsd": (
        lambda t, s, p: kd.jensen_shannon_divergence(
            t, s, 0.3, temperature=1.5, precise=p
        ),
        lambda t, s: jsd64(t, s, 0.3, 1.5).sum(),
    ),
    "global_pointer": (
        lambda t, s, p: kd.global_pointer_kl_divergence(t, s, 3.0, precise=p),
        lambda t, s: global_pointer64(t, s, 3.0, axes=-1).sum(),
    ),
    "binary_symmetric": (
        lambda t, s, p: kd.binary_symmetric_kl_divergence(t, s, 0.5, precise=p),
        lambda t, s: global_pointer64(t, s, 0.5, axes=-1).sum(),
    ),
    "decoupled_kd": (
        lambda t, s, p: kd.decoupled_kd(t, s, LABELS, 1.0, 8.0, 2.0, precise=p),
        lambda t, s: dkd64(t, s, LABELS, 1.0, 8.0, 2.0)[2].sum(),
    ),
    "target_class_kd": (
        lambda t, s, p: kd.target_class_kd(t, s, LABELS, 4.0, precise=p),
        lambda t, s: dkd64(t, s, LABELS, 1.0, 8.0, 4.0)[0].sum(),
    ),
    "non_target_class_kd": (
        lambda t, s, p: kd.non_target_class_kd(t, s, LABELS, 4.0, precise=p),
        lambda t, s: dkd64(t, s, LABELS, 1.0, 8.0, 4.0)[1].sum(),
    ),
}


def _finite_differences(reference, t, s, h=1e-5):
    grads = []
    for which in range(2):
        point = [np.array(t, np.float64), np.array(s, np.float64)]
        grad = np.zeros(point[which].shape)
        for idx in np.ndindex(*grad.shape):
            up = [x.copy() for x in point]
            down = [x.copy() for x in point]
            up[which][idx] += h
            down[which][idx] -= h
            grad[idx] = (reference(*up) - reference(*down)) / (2 * h)
        grads.append(grad)
    return grads


@pytest.mark.parametrize("precise", PATHS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_gradients_match_float64_finite_differences(name, precise, x64):
    # float64 in, float64 out: the closed forms agree with finite
    # differences of the float64 reference to 1e-7, for the student and
    # for the teacher (which may be a trainable input in user code).
    fn, reference = FUNCTIONS[name]
    t, s = _inputs()
    expected = _finite_differences(reference, t, s)
    actual = backend_grad(lambda a, b: fn(a, b, precise), t, s)
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("precise", PATHS)
@pytest.mark.parametrize(
    "name", ["kl", "symmetric_kl", "jsd", "global_pointer"]
)
def test_float32_gradients_match_float64(name, precise):
    fn, reference = FUNCTIONS[name]
    t, s = _inputs(seed=1)
    expected = _finite_differences(reference, f32(t), f32(s))
    actual = backend_grad(lambda a, b: fn(a, b, precise), f32(t), f32(s))
    for got, want in zip(actual, expected):
        scale = np.abs(want).max()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * scale)


@pytest.mark.parametrize("precise", PATHS)
def test_multilabel_and_rdrop_gradients(precise, x64):
    t, s = _inputs(seed=2)
    labels = (t > 0.5).astype("float64")
    grad = backend_grad(
        lambda a: kd.multilabel_categorical_crossentropy(labels, a), s
    )[0]
    want = _finite_differences(lambda a, b: mlce64(labels, b).sum(), t, s)[1]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)
    sparse = np.array([0, 0, 4, 4, 2, 2])
    loss = losses.RDropSparseCategoricalCrossentropy(
        3.0, True, reduction="sum", dtype="float64", precise=precise
    )
    grad = backend_grad(lambda a: loss(sparse, a), s)[0]
    want = _finite_differences(
        lambda a, b: _rdrop64_rows(sparse, b, 3.0), t, s
    )[1]
    np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-8)
    dense = losses.RDropCategoricalCrossentropy(
        3.0, True, reduction="sum", dtype="float64", precise=precise
    )
    one_hot = np.eye(7)[sparse]
    np.testing.assert_allclose(
        backend_grad(lambda a: dense(one_hot, a), s)[0], want, rtol=1e-6
    )


def test_kl_gradient_is_the_closed_form():
    # d/ds T^2 KL = T (softmax(s / T) - softmax(t / T)), also far from
    # the teacher and on the precise path.
    t, s = (f32(x) for x in _inputs(seed=3, scale=8.0))
    for precise in PATHS:
        _, grad = backend_grad(
            lambda a, b: kd.kl_divergence(
                a, b, temperature=3.0, precise=precise
            ),
            t,
            s,
        )
        want = 3.0 * (
            special.softmax(s / 3.0, -1) - special.softmax(t / 3.0, -1)
        )
        np.testing.assert_allclose(grad, want, atol=1e-6)


# -------------------------------------------------- compiled and in fit


def _compiled_grad(fn, t, s):
    """Gradients of `sum(fn(t, s))` in the backend's compiled mode."""
    if BACKEND == "jax":
        import jax

        return jax.jit(jax.grad(lambda a, b: keras.ops.sum(fn(a, b)), (0, 1)))(
            t, s
        )
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def grads(a, b):
            with tf.GradientTape() as tape:
                tape.watch([a, b])
                value = tf.reduce_sum(fn(a, b))
            return tape.gradient(value, [a, b])

        return grads(tf.constant(t), tf.constant(s))
    pytest.skip("torch's compiled mode (torch.compile) is not exercised here")


@pytest.mark.parametrize("precise", PATHS)
@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_compiled_gradients_equal_eager(name, precise):
    fn, _ = FUNCTIONS[name]
    t, s = (f32(x) for x in _inputs(seed=4))
    eager = backend_grad(lambda a, b: fn(a, b, precise), t, s)
    compiled = _compiled_grad(lambda a, b: fn(a, b, precise), t, s)
    for got, want in zip(compiled, eager):
        # float32 rounding differs between XLA and eager execution.
        scale = np.abs(want).max()
        np.testing.assert_allclose(np_(got), want, rtol=1e-5, atol=2e-5 * scale)


def test_temperature_tensor_inside_jit():
    # A temperature that is a traced value (a variable under `fit`) is an
    # argument of the custom gradient, not a closed-over constant.
    if BACKEND != "jax":
        pytest.skip("jax.jit only")
    import jax

    t, s = (f32(x) for x in _inputs(seed=5))

    def loss(a, b, temperature):
        return keras.ops.sum(kd.kl_divergence(a, b, temperature=temperature))

    grad = jax.jit(jax.grad(loss, argnums=1))(t, s, 2.5)
    want = backend_grad(
        lambda a, b: kd.kl_divergence(a, b, temperature=2.5), t, s
    )[1]
    np.testing.assert_allclose(np_(grad), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("precise", PATHS)
def test_fit_with_each_divergence(precise):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 5)).astype("float32")
    teacher = rng.normal(size=(16, 4)).astype("float32")
    for loss in (
        losses.KLDivergence(temperature=2.0, precise=precise),
        losses.ReverseKLDivergence(precise=precise),
        losses.SymmetricKLDivergence(precise=precise),
        losses.JensenShannonDivergence(0.3, precise=precise),
        losses.GlobalPointerKLDivergence(precise=precise),
    ):
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
        history = model.fit(x, teacher, epochs=3, batch_size=8, verbose=0)
        values = history.history["loss"]
        assert np.all(np.isfinite(values)) and values[-1] < values[0], loss


# ---------------------------------------------------------- second order


def _second_order(fn, t, s):
    """d/ds sum((d/ds sum(fn(t, s)))**2), by the backend's autodiff."""
    if BACKEND == "jax":
        import jax

        def inner(b):
            return jax.grad(lambda c: keras.ops.sum(fn(t, c)))(b)

        return np_(jax.grad(lambda b: keras.ops.sum(inner(b) ** 2))(s))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        b = tf.constant(s)
        with tf.GradientTape() as outer:
            outer.watch(b)
            with tf.GradientTape() as tape:
                tape.watch(b)
                value = tf.reduce_sum(fn(tf.constant(t), b))
            inner = tape.gradient(value, b)
            total = tf.reduce_sum(inner**2)
        return np_(outer.gradient(total, b))
    import torch

    # On Keras' device (a GPU where there is one), as Keras makes its own.
    b = keras.ops.convert_to_tensor(s).requires_grad_(True)
    value = fn(keras.ops.convert_to_tensor(t), b).sum()
    (inner,) = torch.autograd.grad(value, b, create_graph=True)
    (grad,) = torch.autograd.grad((inner**2).sum(), b)
    return np_(grad)


SECOND_ORDER = {
    "kl": lambda p: (
        lambda t, s: kd.kl_divergence(t, s, temperature=2.0, precise=p)
    ),
    "symmetric_kl": lambda p: (
        lambda t, s: kd.symmetric_kl_divergence(
            t, s, temperature=2.0, precise=p
        )
    ),
    "jsd": lambda p: (
        lambda t, s: kd.jensen_shannon_divergence(t, s, 0.3, precise=p)
    ),
    "global_pointer": lambda p: (
        lambda t, s: kd.global_pointer_kl_divergence(t, s, 2.0, precise=p)
    ),
}


@pytest.mark.parametrize("precise", PATHS)
@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_second_order_gradients_are_exact(name, precise, x64):
    # JAX and TensorFlow differentiate the closed form; torch falls back to
    # autograd of the plain formula (`create_graph=True`).
    fn = SECOND_ORDER[name](precise)
    t, s = _inputs(seed=6)
    got = _second_order(fn, t, s)
    kinds = {"kl": "kl", "symmetric_kl": "symmetric_kl", "jsd": "jsd"}
    if name in kinds:
        beta = 0.3 if name == "jsd" else None
        temperature = 1.0 if name == "jsd" else 2.0

        def plain(a, b):
            return _softmax_driver.reference_divergence(
                kinds[name], a, b, temperature, -1, beta
            )

    else:
        from keras_kd.ops import _global_pointer

        def plain(a, b):
            return keras.ops.sum(_global_pointer._reference(a, b, 2.0), -1)

    want = _second_order(plain, t, s)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-10)


def test_jax_forward_mode_is_a_clear_error():
    if BACKEND != "jax":
        pytest.skip("JAX only")
    import jax

    t, s = (f32(x) for x in _inputs())
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda b: kd.kl_divergence(t, b), (s,), (s,))


def test_torch_value_without_gradient_needs_no_graph():
    if BACKEND != "torch":
        pytest.skip("torch only")
    import torch

    t, s = (torch.tensor(f32(x)) for x in _inputs())
    with torch.no_grad():
        value = kd.kl_divergence(t, s, precise=False)
    assert value.grad_fn is None
    s.requires_grad_(True)
    with contextlib.nullcontext():
        value = kd.kl_divergence(t, s, precise=False)
    assert value.grad_fn is not None
    np.testing.assert_allclose(
        np_(value.detach()), kl64(np_(t), np_(s)), rtol=1e-5
    )
