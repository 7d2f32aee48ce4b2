"""keras_kd.ops.fused_linear_*: divergences and cross-entropy from hidden
states, checked against a dense float64 NumPy computation (values and the
gradients with respect to the student's hidden states and kernel) and
against the backend's own autodiff of the dense keras-kd ops."""

import contextlib

import keras
import numpy as np
import pytest
from keras import ops

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


@pytest.fixture(autouse=True)
def _fresh_session():
    # Lighter than conftest's (no gc.collect()): these tests build no model
    # but one.
    keras.backend.clear_session(free_memory=False)


def np_(x):
    return ops.convert_to_numpy(x)


def close(actual, expected, rtol=1e-5):
    expected = np.asarray(expected, "float64")
    atol = 1e-6 * max(np.max(np.abs(expected)), 1e-30)
    np.testing.assert_allclose(np_(actual), expected, rtol=rtol, atol=atol)


@contextlib.contextmanager
def x64():
    """float64 on this backend (JAX has it only with x64 enabled)."""
    if BACKEND == "jax":
        import jax

        with jax.enable_x64(True):
            yield
    else:
        yield


def value_and_grads(fn, *args, wrt=(0, 1)):
    """`fn(*args)` and its gradients w.r.t. `args[i]`, i in `wrt`, by the
    backend's autodiff (`None` from torch and TF becomes zeros)."""
    if BACKEND == "jax":
        import jax

        return jax.value_and_grad(fn, argnums=wrt)(*args)
    if BACKEND == "torch":
        import torch

        args = [
            torch.tensor(a, requires_grad=i in wrt) for i, a in enumerate(args)
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


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference(
    hs, ks, ht, kt, mask=None, divergence="kl", beta=0.5, temperature=1.0,
    labels=None, alpha=None, caps=(None, None),
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
    lq, lp = log_softmax(zs / t), log_softmax(zt / t)
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
        d = beta * (p * (lp - lm)).sum(-1) + (1 - beta) * (
            q * (lq - lm)
        ).sum(-1)
        r = lq - lm
        g = (1 - beta) * q * (r - (q * r).sum(-1, keepdims=True))
    value = t * t * (w * d).sum()
    grad = t * w[..., None] * g
    if labels is not None:
        l1 = log_softmax(zs)
        ce_rows = -np.take_along_axis(l1, labels[..., None], -1)[..., 0]
        onehot = np.eye(zs.shape[-1])[labels]
        ce = (w * ce_rows).sum()
        g_ce = w[..., None] * (np.exp(l1) - onehot)
        value, grad = alpha * ce + (1 - alpha) * value, (
            alpha * g_ce + (1 - alpha) * grad
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

# ------------------------------------------------------------ divergences


@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_divergence_matches_dense_reference(divergence, beta, temperature):
    hs, ks, ht, kt, mask, _ = make_inputs()
    fn = fused(ht, kt, mask=mask, divergence=divergence, beta=beta,
               temperature=temperature, chunk_size=4)
    expected = reference(hs, ks, ht, kt, mask, divergence, beta, temperature)
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("scale", [0.05, 0.3])
@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_divergence_at_every_distance(divergence, beta, scale):
    # Smaller logits: rows near the teacher (KL(Q || P) < 1), where the
    # divergences take their series path.
    hs, ks, ht, kt, mask, _ = make_inputs(20)
    ks, kt = ks * scale, kt * scale
    fn = fused(ht, kt, mask=mask, divergence=divergence, beta=beta,
               temperature=2.0, chunk_size=4)
    expected = reference(hs, ks, ht, kt, mask, divergence, beta, 2.0)
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_gradients_equal_autodiff_of_dense_keras_kd(divergence, beta):
    # The closed-form gradients against the backend's autodiff of the
    # dense keras-kd ops on materialized logits, all in float64.
    with x64():
        hs, ks, ht, kt, mask, _ = make_inputs(1, "float64")
        kt = kt[:, :V]

        def dense(h, k):
            zs, zt = ops.matmul(h, k), ops.matmul(ht, kt)
            if divergence == "reverse_kl":
                zs, zt = zt, zs
            if divergence == "jsd":
                d = kd.jensen_shannon_divergence(zt, zs, beta, temperature=2.0)
            else:
                d = kd.kl_divergence(zt, zs, temperature=2.0)
            w = ops.convert_to_tensor(mask.astype("float64"))
            return ops.sum(d * w) / ops.sum(w)

        fn = fused(ht, kt, mask=mask, divergence=divergence, beta=beta,
                   temperature=2.0, chunk_size=3)
        value, grads = value_and_grads(dense, hs, ks)
        check(fn, (hs, ks), [np_(x) for x in (value, *grads)], rtol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 3, 13, 14, 100, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    hs, ks, ht, kt, mask, _ = make_inputs(2)
    fn = fused(ht, kt, mask=mask, chunk_size=chunk_size, temperature=2.0)
    check(fn, (hs, ks), reference(hs, ks, ht, kt, mask, temperature=2.0))


def test_masks_bool_float_none_and_all_masked():
    hs, ks, ht, kt, mask, _ = make_inputs(3)

    def run(m):
        return value_and_grads(fused(ht, kt, mask=m), hs, ks)

    as_bool, as_float = run(mask), run(mask.astype("float32"))
    close(as_float[0], np_(as_bool[0]))
    close(as_float[1][0], np_(as_bool[1][0]))
    close(run(None)[0], reference(hs, ks, ht, kt)[0])
    empty = run(np.zeros((B, L), bool))
    assert float(np_(empty[0])) == 0.0
    assert not np.any(np_(empty[1][0])) and not np.any(np_(empty[1][1]))
    weights = np.linspace(0.0, 2.0, B * L).reshape(B, L)
    check(fused(ht, kt, mask=weights), (hs, ks),
          reference(hs, ks, ht, kt, weights))
    none = kd.fused_linear_divergence(hs[:0], ks, ht[:0], kt)
    assert float(np_(none)) == 0.0


def test_masked_tokens_are_ignored_even_if_nan():
    hs, ks, ht, kt, mask, _ = make_inputs(4)
    expected = reference(hs, ks, ht, kt, mask, "jsd", 0.3)
    hs, ht = hs.copy(), ht.copy()
    hs[~mask] = ht[~mask] = np.nan
    fn = fused(ht, kt, mask=mask, divergence="jsd", beta=0.3)
    value, grads = value_and_grads(fn, hs, ks)
    close(value, expected[0])
    close(grads[1], expected[2])
    close(np_(grads[0])[mask], expected[1][mask])


def test_nan_in_a_real_token_gives_nan():
    hs, ks, ht, kt, mask, _ = make_inputs(5)
    for student in (True, False):
        h, t = hs.copy(), ht.copy()
        (h if student else t)[0, np.argmax(mask[0])] = np.nan
        value = kd.fused_linear_divergence(h, ks, t, kt, mask=mask)
        assert np.isnan(np_(value))


def test_padded_teacher_vocabulary_and_too_small_teacher():
    hs, ks, ht, kt, mask, _ = make_inputs(6)
    padded = kd.fused_linear_divergence(hs, ks, ht, kt, mask=mask)
    exact = kd.fused_linear_divergence(hs, ks, ht, kt[:, :V], mask=mask)
    assert np_(padded) == np_(exact)
    with pytest.raises(ValueError, match="`teacher_kernel`"):
        kd.fused_linear_divergence(hs, ks, ht, kt[:, : V - 1])


def test_tied_vocab_by_hidden_layout():
    hs, ks, ht, kt, mask, _ = make_inputs(7)
    expected = reference(hs, ks, ht, kt, mask, "kl", 0.5, 2.0)
    fn = fused(ht, np.ascontiguousarray(kt.T), mask=mask, temperature=2.0,
               student_kernel_layout="vh", teacher_kernel_layout="vh",
               chunk_size=5)
    value, grads = value_and_grads(fn, hs, np.ascontiguousarray(ks.T))
    close(value, expected[0])
    close(grads[0], expected[1])
    close(grads[1], expected[2].T)


@pytest.mark.parametrize("caps", [(3.0, None), (None, 2.0), (3.0, 2.5)])
def test_logit_soft_capping(caps):
    hs, ks, ht, kt, mask, _ = make_inputs(8)
    ks, kt = ks * 4, kt * 4  # logits beyond the caps
    expected = reference(
        hs, ks, ht, kt, mask, "reverse_kl", 0.5, 1.5, caps=caps
    )
    fn = fused(ht, kt, mask=mask, divergence="reverse_kl", temperature=1.5,
               student_logit_soft_cap=caps[0], teacher_logit_soft_cap=caps[1])
    check(fn, (hs, ks), expected)


def test_teacher_gets_no_gradient():
    hs, ks, ht, kt, mask, labels = make_inputs(9)

    def fn(h, k, t, tk):
        return kd.fused_linear_distillation_loss(
            h, k, t, tk, labels, mask=mask, alpha=0.5, divergence="jsd"
        )

    _, grads = value_and_grads(fn, hs, ks, ht, kt, wrt=(0, 1, 2, 3))
    assert np.any(np_(grads[0])) and np.any(np_(grads[1]))
    assert not np.any(np_(grads[2])) and not np.any(np_(grads[3]))


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_float64_in_float64_out(divergence, beta):
    with x64():
        hs, ks, ht, kt, mask, labels = make_inputs(10, "float64")
        expected = reference(hs, ks, ht, kt, mask, divergence, beta, 2.0)
        fn = fused(ht, kt, mask=mask, divergence=divergence, beta=beta,
                   temperature=2.0, chunk_size=4)
        value, grads = check(fn, (hs, ks), expected, rtol=1e-12)
        for x in (value, *grads):
            assert keras.backend.standardize_dtype(x.dtype) == "float64"


def test_half_precision_is_computed_in_float32():
    hs, ks, ht, kt, mask, _ = make_inputs(11, "float16")
    value, grads = value_and_grads(fused(ht, kt, mask=mask), hs, ks)
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    expected = reference(hs, ks, ht, kt, mask)
    close(value, expected[0])
    for grad, wanted in zip(grads, expected[1:]):
        assert keras.backend.standardize_dtype(grad.dtype) == "float16"
        close(grad, wanted, rtol=2e-3)
    bf16 = [ops.cast(x, "bfloat16") for x in (hs, ks, ht, kt)]
    value = kd.fused_linear_divergence(*bf16, mask=mask)
    rounded = [np_(ops.cast(x, "float32")) for x in bf16]
    close(value, reference(*rounded, mask)[0])


# ---------------------------------------------------------------- accuracy


def _dyadic(rng, shape, step, low, high):
    return (rng.integers(low, high, size=shape) * step).astype("float32")


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_student_close_to_teacher_is_exact(divergence, beta, temperature):
    # Dyadic inputs: every float32 matmul is exact, so the float64
    # reference is the truth. The student differs from the teacher by
    # 2**-14 on a few kernel entries: divergences of ~1e-9.
    rng = np.random.default_rng(12)
    hs = _dyadic(rng, (B, L, HS), 1.0, -3, 4)
    kt = _dyadic(rng, (HS, V), 2.0**-4, -32, 33)
    ks = kt.copy()
    ks[rng.integers(0, HS, 6), rng.integers(0, V, 6)] += 2.0**-14
    fn = fused(hs, kt, divergence=divergence, beta=beta,
               temperature=temperature, chunk_size=4)
    expected = reference(hs, ks, hs, kt, None, divergence, beta, temperature)
    assert 0 < expected[0] < 1e-7
    check(fn, (hs, ks), expected)


@pytest.mark.parametrize("divergence,beta", NOT_ENDS)
def test_confident_logits_are_exact(divergence, beta):
    # Teacher logits beyond +-1e3, student beyond +-1e2 (dyadic: exact).
    rng = np.random.default_rng(13)
    hs = _dyadic(rng, (B, L, HS), 1.0, -3, 4)
    ht = _dyadic(rng, (B, L, HT), 1.0, -3, 4)
    ks = _dyadic(rng, (HS, V), 2.0**-2, -128, 129)
    kt = _dyadic(rng, (HT, VT), 2.0**-2, -1024, 1025)
    assert np.abs(ht @ kt).max() > 1e3 and np.abs(hs @ ks).max() > 1e2
    fn = fused(ht, kt, divergence=divergence, beta=beta, chunk_size=4)
    expected = reference(hs, ks, ht, kt, None, divergence, beta)
    assert expected[0] > 0.5
    check(fn, (hs, ks), expected)


# ------------------------------------------------------- cross-entropy


def test_cross_entropy_matches_dense_reference():
    hs, ks, ht, kt, mask, labels = make_inputs(14)

    def fn(h, k):
        return kd.fused_linear_cross_entropy(
            h, k, labels, mask=mask, chunk_size=3, student_logit_soft_cap=2.0
        )

    expected = reference(
        hs, ks, ht, kt, mask, labels=labels, alpha=1.0, caps=(2.0, None)
    )
    check(fn, (hs, ks), expected)


def test_cross_entropy_out_of_range_labels():
    hs, ks, _, _, mask, labels = make_inputs(15)
    for bad in (-1, V):
        wrong = labels.copy()
        wrong[tuple(np.argwhere(mask)[0])] = bad
        value, grads = value_and_grads(
            lambda h, k: kd.fused_linear_cross_entropy(h, k, wrong, mask),
            hs, ks,
        )
        assert np.isnan(np_(value)) and np.isnan(np_(grads[1])).all()
    ignored = labels.copy()
    ignored[~mask] = -100
    close(
        kd.fused_linear_cross_entropy(hs, ks, ignored, mask),
        np_(kd.fused_linear_cross_entropy(hs, ks, labels, mask)),
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distillation_loss_is_both_terms_from_one_pass(temperature):
    hs, ks, ht, kt, mask, labels = make_inputs(16)
    kwargs = dict(mask=mask, alpha=0.3, divergence="jsd", beta=0.3,
                  temperature=temperature, chunk_size=4)

    def fn(h, k):
        return kd.fused_linear_distillation_loss(h, k, ht, kt, labels,
                                                 **kwargs)

    expected = reference(
        hs, ks, ht, kt, mask, "jsd", 0.3, temperature, labels, alpha=0.3
    )
    check(fn, (hs, ks), expected)
    loss, ce, div = kd.fused_linear_distillation_loss(
        hs, ks, ht, kt, labels, return_components=True, **kwargs
    )
    close(ce, reference(hs, ks, ht, kt, mask, labels=labels, alpha=1.0)[0])
    close(div, reference(hs, ks, ht, kt, mask, "jsd", 0.3, temperature)[0])
    close(loss, 0.3 * np_(ce) + 0.7 * np_(div))


def test_temperature_and_alpha_as_variables():
    hs, ks, ht, kt, mask, labels = make_inputs(17)
    t, a = keras.Variable(2.5), keras.Variable(0.4)

    def fn(h, k):
        return kd.fused_linear_distillation_loss(
            h, k, ht, kt, labels, mask=mask, alpha=a, temperature=t
        )

    expected = reference(
        hs, ks, ht, kt, mask, "kl", 0.5, 2.5, labels, alpha=0.4
    )
    check(fn, (hs, ks), expected)


# ----------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("divergence", {"divergence": "js"}),
        ("beta", {"beta": 1.5}),
        ("temperature", {"temperature": 0.0}),
        ("temperature", {"temperature": -1.0}),
        ("chunk_size", {"chunk_size": 0}),
        ("student_kernel_layout", {"student_kernel_layout": "transposed"}),
        ("student_logit_soft_cap", {"student_logit_soft_cap": 0.0}),
        ("alpha", {"alpha": 1.5}),
    ],
)
def test_invalid_arguments_name_the_argument(name, kwargs):
    hs, ks, ht, kt, mask, labels = make_inputs()
    with pytest.raises(ValueError, match=f"argument `{name}`"):
        kd.fused_linear_distillation_loss(
            hs, ks, ht, kt, labels, mask=mask, **kwargs
        )


def test_invalid_shapes_name_the_argument():
    hs, ks, ht, kt, mask, labels = make_inputs()
    for name, args in [
        ("student_kernel", (hs, ks.T, ht, kt)),
        ("teacher_kernel", (hs, ks, ht, kt[:3])),
        ("teacher_kernel", (hs, ks, ht, kt[:, :5])),
        ("teacher_hidden", (hs, ks, ht[:, :3], kt)),
    ]:
        with pytest.raises(ValueError, match=f"argument `{name}`"):
            kd.fused_linear_divergence(*args)
    with pytest.raises(ValueError, match="argument `mask`"):
        kd.fused_linear_divergence(hs, ks, ht, kt, mask=mask[:, :3])
    with pytest.raises(ValueError, match="argument `labels`"):
        kd.fused_linear_cross_entropy(hs, ks, labels[0])


# ------------------------------------------------------------ compiled


def _compiled_step(fn):
    """`fn`'s value and gradients w.r.t. its first two arguments, compiled
    as `model.fit` compiles a step (torch: eager)."""
    if BACKEND == "jax":
        import jax

        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    if BACKEND == "torch":
        return lambda h, k, *rest: value_and_grads(
            lambda h, k: fn(h, k, *rest), h, k
        )
    import tensorflow as tf

    def step(h, k, *rest):
        with tf.GradientTape() as tape:
            tape.watch([h, k])
            value = fn(h, k, *rest)
        return value, tape.gradient(value, [h, k])

    return tf.function(step, jit_compile=True)


def test_compiled_equals_reference():
    hs, ks, ht, kt, mask, labels = make_inputs(18)

    def fn(h, k, t, m, y):
        return kd.fused_linear_distillation_loss(
            h, k, t, kt, y, mask=m, alpha=0.2, temperature=2.0,
            divergence="reverse_kl", chunk_size=4,
        )

    expected = reference(
        hs, ks, ht, kt, mask, "reverse_kl", 0.5, 2.0, labels, alpha=0.2
    )
    value, grads = _compiled_step(fn)(hs, ks, ht, mask, labels)
    for actual, wanted in zip([value, *grads], expected):
        close(actual, wanted)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        # A token count unknown while tracing (a smaller last batch).
        dims = [[None, None, HS], list(ks.shape), [None, None, HT]]
        spec = [tf.TensorSpec(d) for d in dims] + [
            tf.TensorSpec([None, None], tf.bool),
            tf.TensorSpec([None, None], tf.int64),
        ]
        step = _compiled_step(fn).python_function
        value, grads = tf.function(step, input_signature=spec)(
            hs, ks, ht, mask, labels
        )
        for actual, wanted in zip([value, *grads], expected):
            close(actual, wanted)


@pytest.mark.skipif(BACKEND != "torch", reason="torch-only fast path")
def test_torch_without_gradients_skips_the_backward_work():
    import torch

    hs, ks, ht, kt, mask, _ = make_inputs(19)
    with torch.no_grad():
        value = kd.fused_linear_divergence(hs, ks, ht, kt, mask=mask)
    close(value, reference(hs, ks, ht, kt, mask)[0])


def test_model_fit_learns_from_hidden_states():
    rng = np.random.default_rng(19)
    tokens = rng.integers(0, V, size=(16, 8))
    teacher_table = rng.normal(size=(V, HT)).astype("float32")
    kt = rng.normal(size=(HT, VT)).astype("float32")

    class TinyLM(keras.Model):
        def __init__(self):
            super().__init__()
            self.embed = keras.layers.Embedding(V, HS)
            self.head = self.add_weight(shape=(V, HS), name="head")

        def call(self, x):
            return self.embed(x)

        def compute_loss(self, x, y, y_pred, sample_weight=None, **kwargs):
            teacher = ops.take(ops.convert_to_tensor(teacher_table), x, 0)
            return kd.fused_linear_distillation_loss(
                y_pred, self.head, teacher, kt, y, alpha=0.5,
                temperature=2.0, student_kernel_layout="vh", chunk_size=24,
            )

    model = TinyLM()
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    model.build((None, 7))
    head = np_(model.head).copy()
    history = model.fit(
        tokens[:, :-1], tokens[:, 1:], batch_size=8, epochs=8, verbose=0
    )
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.85 * losses[0]
    assert np.all(np_(model.head) != head)
