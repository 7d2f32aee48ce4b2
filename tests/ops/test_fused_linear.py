"""keras_kd.ops.fused_linear_*: the contract around the math: masks,
NaN, padded vocabularies, tied layouts, soft caps, no teacher gradient,
half precision, variables, argument checks, compiled steps and
`model.fit` on every backend."""

import keras
import numpy as np
import pytest
from _fused_linear_cases import (
    BACKEND,
    HS,
    HT,
    VT,
    B,
    L,
    V,
    check,
    close,
    fused,
    make_inputs,
    np_,
    reference,
    value_and_grads,
)
from keras import ops

from keras_kd import ops as kd


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
    check(
        fused(ht, kt, mask=weights),
        (hs, ks),
        reference(hs, ks, ht, kt, weights),
    )
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
    fn = fused(
        ht,
        np.ascontiguousarray(kt.T),
        mask=mask,
        temperature=2.0,
        student_kernel_layout="vh",
        teacher_kernel_layout="vh",
        chunk_size=5,
    )
    value, grads = value_and_grads(fn, hs, np.ascontiguousarray(ks.T))
    close(value, expected[0])
    close(grads[0], expected[1])
    close(grads[1], expected[2].T)


@pytest.mark.parametrize("precise", [True, False])
@pytest.mark.parametrize("caps", [(3.0, None), (None, 2.0), (3.0, 2.5)])
def test_logit_soft_capping(caps, precise):
    hs, ks, ht, kt, mask, _ = make_inputs(8)
    ks, kt = ks * 4, kt * 4  # logits beyond the caps
    expected = reference(
        hs, ks, ht, kt, mask, "reverse_kl", 0.5, 1.5, caps=caps
    )
    fn = fused(
        ht,
        kt,
        mask=mask,
        divergence="reverse_kl",
        temperature=1.5,
        student_logit_soft_cap=caps[0],
        teacher_logit_soft_cap=caps[1],
        precise=precise,
    )
    if precise:
        check(fn, (hs, ks), expected)
        return
    # The fast path's reverse-KL gradient Q (log Q - log P - KL) rounds
    # its small entries in absolute terms: compared as vectors.
    value, grads = value_and_grads(fn, hs, ks)
    close(value, expected[0])
    for grad, wanted in zip(grads, expected[1:]):
        error = np_(grad).astype("float64") - wanted
        assert np.linalg.norm(error) <= 1e-5 * np.linalg.norm(wanted)


def test_teacher_gets_no_gradient():
    hs, ks, ht, kt, mask, labels = make_inputs(9)

    def fn(h, k, t, tk):
        return kd.fused_linear_distillation_loss(
            h, k, t, tk, labels, mask=mask, alpha=0.5, divergence="jsd"
        )

    _, grads = value_and_grads(fn, hs, ks, ht, kt, wrt=(0, 1, 2, 3))
    assert np.any(np_(grads[0])) and np.any(np_(grads[1]))
    assert not np.any(np_(grads[2])) and not np.any(np_(grads[3]))


def _dense_head_loss(mask):
    """The dense computation as a half-precision model runs it: logits
    from its `Dense` head in that precision, the divergence in float32."""

    def fn(h, k, t, tk):
        zs = ops.cast(ops.matmul(h, ops.cast(k, h.dtype)), "float32")
        zt = ops.matmul(t, ops.cast(tk[:, :V], t.dtype))
        zt = ops.cast(zt, "float32")
        per_token = kd.kl_divergence(zt, zs)
        weights = ops.cast(mask, "float32")
        return ops.sum(per_token * weights) / ops.sum(weights)

    return fn


@pytest.mark.parametrize(
    "dtype,kernel_dtype",
    [
        ("float16", "float16"),
        ("bfloat16", "bfloat16"),
        ("bfloat16", "float32"),  # a mixed_bfloat16 model's variables
    ],
)
def test_half_precision_products_match_the_dense_head(dtype, kernel_dtype):
    # The products run in the inputs' precision (as the model's own head
    # would, and as GPUs are fast at), the softmax math in float32: the
    # dense computation of a half-precision model, with half-precision
    # gradients.
    hs, ks, ht, kt, mask, _ = make_inputs(11)
    half = [
        ops.cast(x, d)
        for x, d in zip((hs, ks, ht, kt), (dtype, kernel_dtype) * 2)
    ]
    value, grads = value_and_grads(
        fused(half[2], half[3], mask=mask), *half[:2]
    )
    dense_value, dense_grads = value_and_grads(
        lambda h, k: _dense_head_loss(mask)(h, k, half[2], half[3]),
        *half[:2],
    )
    for grad, wanted in zip(grads, (dtype, kernel_dtype)):
        assert keras.backend.standardize_dtype(grad.dtype) == wanted
    assert keras.backend.standardize_dtype(value.dtype) == "float32"
    # Logits rounded to half precision (eager torch, TensorFlow), or kept
    # in float32 where XLA folds the cast into the product (JAX).
    rounded = [np_(ops.cast(ops.cast(x, dtype), "float32")) for x in half]
    exact = reference(*rounded, mask)[0]
    found = float(np_(value))
    assert any(
        abs(found - wanted) <= 1e-5 * abs(wanted)
        for wanted in (float(np_(dense_value)), exact)
    ), (found, float(np_(dense_value)), exact)
    for grad, wanted in zip(grads, dense_grads):
        wanted = np_(ops.cast(wanted, "float32")).astype("float64")
        error = np_(ops.cast(grad, "float32")) - wanted
        # Both are rounded to half precision: compare as vectors.
        assert np.linalg.norm(error) <= 1e-2 * np.linalg.norm(wanted)


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
            h,
            k,
            t,
            kt,
            y,
            mask=m,
            alpha=0.2,
            temperature=2.0,
            divergence="reverse_kl",
            chunk_size=4,
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
                y_pred,
                self.head,
                teacher,
                kt,
                y,
                alpha=0.5,
                temperature=2.0,
                student_kernel_layout="vh",
                chunk_size=24,
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
