"""Keras-side helpers shared by the tests: NumPy conversion, tolerances,
backend autodiff, float64 on every backend and the engine-path fixture."""

import contextlib

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(params=["precise", "fast"])
def engine_path(request, monkeypatch):
    """Runs a test once on each path: `precise=None` (the default of every
    divergence and loss) resolves to the path under test."""
    from keras_kd.ops import _gradients

    precise = request.param == "precise"
    monkeypatch.setattr(_gradients, "default_precise", lambda: precise)
    return request.param


@contextlib.contextmanager
def x64():
    """float64 on this backend (JAX has it only with x64 enabled)."""
    if BACKEND == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def np_(x):
    return keras.ops.convert_to_numpy(x)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np_(actual), expected, rtol=rtol, atol=atol)


def backend_grad(fn, *args):
    """Gradients of `sum(fn(*args))` by the backend's own autodiff."""
    if BACKEND == "jax":
        import jax

        argnums = tuple(range(len(args)))
        grads = jax.grad(lambda *a: keras.ops.sum(fn(*a)), argnums=argnums)(
            *[keras.ops.convert_to_tensor(a) for a in args]
        )
    elif BACKEND == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        keras.ops.sum(fn(*tensors)).backward()
        grads = [t.grad for t in tensors]
    else:
        import tensorflow as tf

        tensors = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            for t in tensors:
                tape.watch(t)
            value = keras.ops.sum(fn(*tensors))
        grads = tape.gradient(value, tensors)
    # an argument outside the differentiable path gets None (torch, TF)
    return [
        np.zeros(np.shape(a)) if g is None else np_(g)
        for a, g in zip(args, grads)
    ]
