"""Half-precision logits (bfloat16, float16) in the dense divergences.

The value is float32 and within float32 rounding of float64 on the
half-precision inputs; each gradient entry is the float64 gradient rounded
once to the inputs' dtype; masked entries, NaN rows and blocks of rows
behave as in float32; and on torch and JAX no float32 array of the
logits' size exists at any point of the forward and backward passes."""

import math

import keras
import numpy as np
import pytest
from _cases import jsd64, kl64, log_softmax64, symmetric_kl64
from _cases_keras import BACKEND, engine_path, np_  # noqa: F401

from keras_kd import ops as kd
from keras_kd.ops import _half_logits

pytestmark = pytest.mark.usefixtures("engine_path")

# Unit roundoff of each half-precision dtype (round to nearest).
ROUNDOFF = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
BETA = 0.3
FUNCTIONS = {
    "kl": lambda t, s, temp: kd.kl_divergence(t, s, temperature=temp),
    "symmetric_kl": lambda t, s, temp: kd.symmetric_kl_divergence(
        t, s, temperature=temp
    ),
    "jsd": lambda t, s, temp: kd.jensen_shannon_divergence(
        t, s, beta=BETA, temperature=temp
    ),
}
REFERENCES = {
    "kl": kl64,
    "symmetric_kl": symmetric_kl64,
    "jsd": lambda t, s, temp: jsd64(t, s, BETA, temp),
}


def _grads64(kind, t, s, temp):
    """Float64 gradients `(d/dt, d/ds)` of the per-row value (times
    `T**2`), from the closed forms, 0 where neither side has mass."""
    lp, lq = log_softmax64(t, temp), log_softmax64(s, temp)
    p, q = np.exp(lp), np.exp(lq)
    both = (p > 0) | (q > 0)

    def mean(w, x):
        return np.sum(np.where(w > 0, w * x, 0.0), -1, keepdims=True)

    # Both sides are masked alike: finite logs stand in where neither has
    # mass, and the gradients there are set to 0 below.
    lp, lq = np.where(both, lp, 0.0), np.where(both, lq, 0.0)
    u = lp - lq
    if kind == "kl":
        ga, gb = q - p, p * (u - mean(p, u))
    elif kind == "symmetric_kl":
        ga = q * (mean(q, u) - u) - (p - q)
        gb = p * (u - mean(p, u)) + (p - q)
    else:
        lm = np.logaddexp(lp + math.log(BETA), lq + math.log1p(-BETA))
        l_, x = lm - lq, lp - lm
        ga = (1 - BETA) * q * (mean(q, l_) - l_)
        gb = BETA * p * (x - mean(p, x))
    return temp * np.where(both, gb, 0.0), temp * np.where(both, ga, 0.0)


def _logits(shape, seed, dtype):
    """Logits of scale 3 rounded to `dtype`, as float64 and as tensors;
    row 1 has entries masked on both sides."""
    rng = np.random.default_rng(seed)
    t, s = (3.0 * rng.standard_normal(shape) for _ in range(2))
    flat_t, flat_s = t.reshape(-1, shape[-1]), s.reshape(-1, shape[-1])
    flat_t[1, :3] = flat_s[1, :3] = -np.inf
    tensors = [keras.ops.convert_to_tensor(x, dtype) for x in (t, s)]
    rounded = [np_(keras.ops.cast(x, "float64")) for x in tensors]
    return rounded, tensors


def _value_and_grads(fn, t, s):
    """The value and `(d/dt, d/ds)` of `sum(w * value)` by the backend."""
    w = np.linspace(0.5, 1.5, math.prod(t.shape[:-1])).reshape(t.shape[:-1])
    weights = keras.ops.convert_to_tensor(w, "float32")
    if BACKEND == "jax":
        import jax

        def total(t, s):
            return keras.ops.sum(fn(t, s) * weights)

        grads = jax.grad(total, argnums=(0, 1))(t, s)
        value = fn(t, s)
    elif BACKEND == "torch":
        t, s = (x.detach().clone().requires_grad_() for x in (t, s))
        value = fn(t, s)
        keras.ops.sum(value * weights).backward()
        grads = (t.grad, s.grad)
    else:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch([t, s])
            value = fn(t, s)
            total = keras.ops.sum(value * weights)
        grads = tape.gradient(total, [t, s])
    return value, grads, w


@pytest.fixture(params=[None, 3], ids=["one_block", "blocks_of_3"])
def blocks(request, monkeypatch):
    """The default blocks (one here), or 3 rows per block, a last block
    of fewer."""
    if request.param is not None:
        monkeypatch.setattr(
            _half_logits, "rows_per_block", lambda classes: request.param
        )
    return request.param


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
@pytest.mark.parametrize("temp", [1.0, 2.0, 1.7])
def test_values_and_gradients_against_float64(blocks, dtype, kind, temp):
    shape = (2, 5, 40)
    (t64, s64), (t, s) = _logits(shape, [len(kind), int(10 * temp)], dtype)
    fn = lambda a, b: FUNCTIONS[kind](a, b, temp)  # noqa: E731
    value, grads, w = _value_and_grads(fn, t, s)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = REFERENCES[kind](t64, s64, temp)
    np.testing.assert_allclose(np_(value), expected, rtol=2e-6, atol=1e-6)
    for grad, exact in zip(grads, _grads64(kind, t64, s64, temp)):
        assert keras.backend.standardize_dtype(grad.dtype) == dtype
        exact = exact * w[..., None]
        found = np_(keras.ops.cast(grad, "float64"))
        # Rounded once to `dtype` from a float32 result: float32's own
        # error is bounded by the row's largest entry.
        bound = ROUNDOFF[dtype] * np.abs(exact)
        bound += 1e-6 * np.abs(exact).max(-1, keepdims=True) + 1e-30
        if dtype == "float16":
            bound += 2.0**-25  # float16 subnormals
        assert np.all(np.abs(found - exact) <= bound)
        assert np.all(found[..., :3].reshape(-1, 3)[1] == 0.0)


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_nan_reaches_its_row_only(blocks, kind):
    shape = (7, 30)
    _, (t, s) = _logits(shape, 5, "bfloat16")
    t_np = np_(keras.ops.cast(t, "float32"))
    t_np[4, 7] = np.nan
    t = keras.ops.convert_to_tensor(t_np, "bfloat16")
    value, grads, _ = _value_and_grads(
        lambda a, b: FUNCTIONS[kind](a, b, 2.0), t, s
    )
    value = np_(value)
    assert np.isnan(value[4])
    assert np.all(np.isfinite(np.delete(value, 4)))
    student = np_(keras.ops.cast(grads[1], "float32"))
    assert np.all(np.isfinite(np.delete(student, 4, axis=0)))


def test_blocks_equal_one_block(monkeypatch):
    _, (t, s) = _logits((11, 64), 9, "bfloat16")
    one = _value_and_grads(lambda a, b: kd.kl_divergence(a, b, 2.0), t, s)
    monkeypatch.setattr(_half_logits, "rows_per_block", lambda classes: 4)
    four = _value_and_grads(lambda a, b: kd.kl_divergence(a, b, 2.0), t, s)
    # The same float32 math per row (XLA may fuse a block's sums in
    # another order: an ulp), then one rounding to bfloat16 (an ulp when
    # the float32 results straddle a rounding boundary).
    np.testing.assert_allclose(np_(one[0]), np_(four[0]), rtol=3e-7)
    for a, b in zip(one[1], four[1]):
        a, b = (np_(keras.ops.cast(x, "float32")) for x in (a, b))
        np.testing.assert_allclose(a, b, rtol=2.0**-7, atol=1e-30)


@pytest.mark.skipif(BACKEND != "torch", reason="torch's operations")
def test_torch_never_makes_a_float32_array_of_the_logits_size(monkeypatch):
    import torch
    from torch.overrides import TorchFunctionMode

    rows, classes, block = 64, 500, 4
    monkeypatch.setattr(_half_logits, "rows_per_block", lambda c: block)
    largest = []

    class Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            found = result if isinstance(result, (tuple, list)) else [result]
            for x in found:
                if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                    largest.append(x.numel())
            return result

    _, (t, s) = _logits((rows, classes), 3, "bfloat16")
    s = s.detach().clone().requires_grad_()
    with Watch():
        value = kd.kl_divergence(t, s, temperature=2.0)
        value.mean().backward()
    assert s.grad.dtype == torch.bfloat16
    assert largest and max(largest) <= block * classes


@pytest.mark.skipif(BACKEND != "jax", reason="JAX's programs")
def test_jax_program_holds_no_float32_array_of_the_logits_size():
    import jax

    rows, classes = 256, 32000
    _, (t, s) = _logits((rows, classes), 4, "bfloat16")

    def loss(t, s):
        return keras.ops.mean(kd.kl_divergence(t, s, temperature=2.0))

    program = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(t, s)
    sizes = list(_float32_sizes(program.jaxpr))
    block = _half_logits.rows_per_block(classes)
    assert block < rows
    assert sizes and max(sizes) <= block * classes


def _float32_sizes(jaxpr):
    """Element counts of every float32 value of `jaxpr` and of the
    programs inside it (loops, custom gradients)."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            aval = var.aval
            if getattr(aval, "dtype", None) == np.float32:
                yield math.prod(aval.shape)
        for param in eqn.params.values():
            for inner in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(inner, "jaxpr", inner)
                if hasattr(inner, "eqns"):
                    yield from _float32_sizes(inner)


@pytest.mark.parametrize("kind", sorted(FUNCTIONS))
def test_a_tensor_temperature_equals_a_float_one(blocks, kind):
    # A temperature held in a variable (a scheduler's) reaches the blocks
    # as a tensor; it is cast to float32, not to the logits' dtype.
    _, (t, s) = _logits((9, 40), 6, "bfloat16")
    temp = keras.Variable(1.7, dtype="float32", trainable=False)
    found = _value_and_grads(lambda a, b: FUNCTIONS[kind](a, b, temp), t, s)
    plain = _value_and_grads(lambda a, b: FUNCTIONS[kind](a, b, 1.7), t, s)
    np.testing.assert_allclose(np_(found[0]), np_(plain[0]), rtol=1e-6)
    for a, b in zip(found[1], plain[1]):
        a, b = (np_(keras.ops.cast(x, "float32")) for x in (a, b))
        np.testing.assert_allclose(a, b, rtol=2.0**-7, atol=1e-30)
