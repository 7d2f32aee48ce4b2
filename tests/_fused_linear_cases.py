"""Shared pieces of the fused linear loss tests: small inputs, the dense
float64 NumPy reference (values and gradients with respect to the
student's hidden states and kernel) and the backend's autodiff."""

import keras
import numpy as np
from _cases import log_softmax64
from _cases_keras import (  # noqa: F401 (the fused tests take them here)
    np_,
    x64,
)

from keras_kd import ops as kd

BACKEND = keras.backend.backend()
B, L, HS, HT, V, VT = 2, 7, 5, 6, 11, 13
DIVERGENCES = [
    ("kl", 0.5),
    ("reverse_kl", 0.5),
    ("jsd", 0.0),
    ("jsd", 0.3),
    ("jsd", 1.0),
]


def close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, "float64")
    atol = 1e-6 * max(np.max(np.abs(expected)), 1e-30)
    np.testing.assert_allclose(np_(actual), expected, rtol=rtol, atol=atol)


def value_and_grads(fn, *args, wrt=(0, 1)):
    """`fn(*args)` and its gradients w.r.t. `args[i]`, i in `wrt`, by the
    backend's autodiff (`None` from torch and TF becomes zeros)."""
    if BACKEND == "jax":
        import jax

        return jax.value_and_grad(fn, argnums=wrt)(*args)
    if BACKEND == "torch":
        import torch

        args = [
            torch.as_tensor(a).detach().clone().requires_grad_(i in wrt)
            for i, a in enumerate(args)
        ]
        value = fn(*args)
        value.backward()
        grads = [args[i].grad for i in wrt]
    else:
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch([args[i] for i in wrt])
            value = fn(*args)
        grads = tape.gradient(value, [args[i] for i in wrt])
    grads = [
        np.zeros(np.shape(args[i])) if g is None else g
        for i, g in zip(wrt, grads)
    ]
    return value, grads


def make_inputs(seed=0, dtype="float32"):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(B, L, HS)).astype(dtype),
        rng.normal(size=(HS, V)).astype(dtype),
        rng.normal(size=(B, L, HT)).astype(dtype),
        rng.normal(size=(HT, VT)).astype(dtype),
        rng.random((B, L)) > 0.3,
        rng.integers(0, V, size=(B, L)),
    )


# ----------------------------------------------------- dense NumPy reference


def reference(
    hs,
    ks,
    ht,
    kt,
    mask=None,
    divergence="kl",
    beta=0.5,
    temperature=1.0,
    labels=None,
    alpha=None,
    caps=(None, None),
):
    """Dense float64 loss and its gradients w.r.t. `hs` and `ks`."""
    hs, ks = hs.astype("float64"), ks.astype("float64")
    ht, kt = ht.astype("float64"), kt.astype("float64")
    raw = hs @ ks
    zs, zt = raw, ht @ kt[:, : ks.shape[1]]
    if caps[0] is not None:
        zs = caps[0] * np.tanh(raw / caps[0])
    if caps[1] is not None:
        zt = caps[1] * np.tanh(zt / caps[1])
    w = np.ones(hs.shape[:-1]) if mask is None else mask.astype("float64")
    w = w / max(w.sum(), 1e-300)
    t = temperature
    lq, lp = log_softmax64(zs / t), log_softmax64(zt / t)
    q, p = np.exp(lq), np.exp(lp)
    if divergence == "jsd" and beta in (0.0, 1.0):
        divergence = "kl" if beta == 0.0 else "reverse_kl"
    if divergence == "kl":
        d = (p * (lp - lq)).sum(-1)
        g = q - p
    elif divergence == "reverse_kl":
        d = (q * (lq - lp)).sum(-1)
        g = q * (lq - lp - d[..., None])
    else:
        lm = np.log(beta * p + (1 - beta) * q)
        d = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (q * (lq - lm)).sum(
            -1
        )
        r = lq - lm
        g = (1 - beta) * q * (r - (q * r).sum(-1, keepdims=True))
    value = t * t * (w * d).sum()
    grad = t * w[..., None] * g
    if labels is not None:
        l1 = log_softmax64(zs)
        ce_rows = -np.take_along_axis(l1, labels[..., None], -1)[..., 0]
        onehot = np.eye(zs.shape[-1])[labels]
        ce = (w * ce_rows).sum()
        g_ce = w[..., None] * (np.exp(l1) - onehot)
        value, grad = (
            alpha * ce + (1 - alpha) * value,
            (alpha * g_ce + (1 - alpha) * grad),
        )
    if caps[0] is not None:
        grad = grad * (1 - np.tanh(raw / caps[0]) ** 2)
    g_hidden = grad @ ks.T
    g_kernel = hs.reshape(-1, HS).T @ grad.reshape(-1, grad.shape[-1])
    return value, g_hidden, g_kernel


def check(fn, inputs, expected, rtol=1e-5):
    value, grads = value_and_grads(fn, *inputs)
    for actual, wanted in zip([value, *grads], expected):
        close(actual, wanted, rtol)
    return value, grads


def fused(ht, kt, **kwargs):
    """`(h, k) -> fused_linear_divergence(h, k, ht, kt, **kwargs)`."""
    return lambda h, k: kd.fused_linear_divergence(h, k, ht, kt, **kwargs)


NOT_ENDS = DIVERGENCES[:2] + DIVERGENCES[3:4]


def _dyadic(rng, shape, step, low, high):
    return (rng.integers(low, high, size=shape) * step).astype("float32")
