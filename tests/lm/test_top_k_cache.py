"""Offline language-model distillation: the top-k cache of a keras-hub
teacher, the bucketed KL computed from hidden states (against the dense KL
at k = vocab and float64 references at small k, values and gradients), and
the CausalLMDistiller trained from the cache."""

import keras
import numpy as np
import pytest
from _cases import log_softmax64
from _fused_linear_cases import (
    V,
    close,
    make_inputs,
    np_,
    reference,
    value_and_grads,
    x64,
)
from keras import ops

import keras_kd
from keras_kd import losses
from keras_kd import ops as kd

keras_hub = pytest.importorskip("keras_hub")

from test_causal_lm import batch, llama  # noqa: E402
from test_causal_lm import logits as logits_of  # noqa: E402  (needs keras_hub)

VOCAB = 40


def logsumexp(z, axis=-1):
    top = np.max(z, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):  # log(0) = -inf: an empty tail
        total = np.log(np.exp(z - top).sum(axis, keepdims=True))
    return np.squeeze(top + total, axis)


def top_k_teacher(logits, k, t=1.0):
    """float64 `(log_probs, ids, tail)` of `logits / t`."""
    lp = log_softmax64(np.asarray(logits, "float64") / t)
    ids = np.argsort(-lp, axis=-1, kind="stable")[..., :k]
    rest = lp.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    return np.take_along_axis(lp, ids, -1), ids.astype("int32"), logsumexp(rest)


def teacher_buckets(log_probs, tail):
    """The teacher's k + 1 bucket log-probabilities, normalized."""
    lp_b = np.concatenate([log_probs, tail[..., None]], -1).astype("float64")
    return lp_b - logsumexp(lp_b)[..., None]


def bucketed_kl(student_logits, log_probs, ids, tail):
    """NumPy float64 per-token KL of the (k + 1)-bucket teacher from the
    student's buckets."""
    lq = log_softmax64(student_logits)
    rest = lq.copy()
    np.put_along_axis(rest, ids, -np.inf, -1)
    lq_b = np.concatenate(
        [np.take_along_axis(lq, ids, -1), logsumexp(rest)[..., None]], -1
    )
    lp_b = teacher_buckets(log_probs, tail)
    p = np.exp(lp_b)
    return (p * np.where(p > 0, lp_b - lq_b, 0.0)).sum(-1)


def dense_bucketed(hs, ks, log_probs, ids, tail, mask, t, cap=None, vh=False):
    """float64 `T**2 mean KL` and its gradients by the backend's autodiff,
    the student's buckets from its full log-softmax."""
    lp_b = teacher_buckets(log_probs, tail)
    p, w = np.exp(lp_b), mask.astype("float64") / mask.sum()

    def loss(h, kernel):
        # NumPy first operands meet torch tensors badly: tensors from here.
        p_, lp_, w_ = (ops.convert_to_tensor(a) for a in (p, lp_b, w))
        z = ops.einsum("blh,vh->blv" if vh else "blh,hv->blv", h, kernel)
        if cap is not None:
            z = ops.tanh(z / cap) * cap
        lq = ops.log_softmax(z / t, axis=-1)
        in_top = ops.sum(ops.one_hot(ids, z.shape[-1]), axis=-2) > 0
        tail_q = ops.logsumexp(
            ops.where(in_top, -np.inf, lq), axis=-1, keepdims=True
        )
        lq_b = ops.concatenate([ops.take_along_axis(lq, ids, -1), tail_q], -1)
        kl = ops.sum(ops.where(p_ > 0, p_ * (lp_ - lq_b), 0.0), axis=-1)
        return t * t * ops.sum(w_ * kl)

    with x64():
        value, grads = value_and_grads(
            loss, hs.astype("float64"), ks.astype("float64")
        )
        return [np_(value)] + [np_(g) for g in grads]


def top_k(*teacher, **kwargs):
    """`(h, k) -> fused_linear_top_k_divergence(h, k, *teacher, ...)`."""
    return lambda h, k: kd.fused_linear_top_k_divergence(
        h, k, *teacher, **kwargs
    )


def check(fn, hs, ks, expected, rtol=1e-5):
    value, grads = value_and_grads(fn, hs, ks)
    for actual, wanted in zip([value, *grads], expected):
        close(actual, wanted, rtol)


# ----------------------------------------------------- the loss, no models


@pytest.mark.parametrize("t,chunk", [(1.0, None), (2.0, 3)])
def test_full_vocabulary_equals_the_dense_kl(t, chunk):
    hs, ks, ht, kt, mask, labels = make_inputs(0)
    lp, ids, tail = top_k_teacher(ht.astype("float64") @ kt[:, :V], V, t)
    assert np.all(tail == -np.inf)
    args = (lp.astype("float32"), ids, tail.astype("float32"))
    expected = reference(hs, ks, ht, kt, mask, "kl", temperature=t)
    fn = top_k(*args, mask=mask, temperature=t, chunk_size=chunk)
    check(fn, hs, ks, expected)
    expected = reference(
        hs, ks, ht, kt, mask, "kl", temperature=t, labels=labels, alpha=0.3
    )
    check(
        lambda h, k: kd.fused_linear_top_k_distillation_loss(
            h, k, *args, labels, mask=mask, alpha=0.3, temperature=t
        ),
        hs,
        ks,
        expected,
    )


@pytest.mark.parametrize(
    "k,t,cap,vh", [(1, 1.0, None, False), (4, 2.0, 3.0, True)]
)
def test_small_k_equals_float64_autodiff(k, t, cap, vh):
    hs, ks, ht, kt, mask, _ = make_inputs(1)
    ks = ks.T.copy() if vh else ks
    lp, ids, tail = top_k_teacher(ht.astype("float64") @ kt[:, :V], k, t)
    lp, tail = lp.astype("float32"), tail.astype("float32")
    fn = top_k(
        lp,
        ids,
        tail,
        mask=mask,
        temperature=t,
        chunk_size=4,
        student_kernel_layout="vh" if vh else "hv",
        student_logit_soft_cap=cap,
    )
    expected = dense_bucketed(hs, ks, lp, ids, tail, mask, t, cap, vh)
    check(fn, hs, ks, expected)


def test_float64_inputs_are_computed_in_float64():
    hs, ks, ht, kt, mask, _ = make_inputs(6, dtype="float64")
    lp, ids, tail = top_k_teacher(ht @ kt[:, :V], 4, 2.0)
    expected = dense_bucketed(hs, ks, lp, ids, tail, mask, 2.0)
    with x64():
        value, grads = value_and_grads(
            top_k(lp, ids, tail, mask=mask, temperature=2.0), hs, ks
        )
        assert keras.backend.standardize_dtype(value.dtype) == "float64"
        for actual, wanted in zip([value, *grads], expected):
            np.testing.assert_allclose(np_(actual), wanted, 1e-10, 1e-14)


def test_extreme_tails_and_a_student_at_its_teacher():
    rng = np.random.default_rng(2)
    h = rng.normal(size=(1, 6, 5)).astype("float32")
    kernel = rng.normal(size=(5, V)).astype("float32")
    z = h.astype("float64") @ kernel
    lp, ids, tail = top_k_teacher(rng.normal(size=z.shape), 3)
    near = top_k_teacher(z + 1e-4 * rng.normal(size=z.shape), 3)
    cases = {
        # The student's tail underflows in float32 (~1e-300 of its mass).
        "confident": (h * 200.0, lp, ids, tail),
        # The top 3 hold all the teacher's mass (an empty tail bucket).
        "no tail": (h, lp - logsumexp(lp)[..., None], ids, tail - np.inf),
        # The teacher's buckets are the student's, moved by ~1e-4: a KL of
        # ~2e-9, which a difference of log-probabilities would lose.
        "near": (h,) + near,
    }
    ones = np.ones(h.shape[:-1], bool)
    for name, (hidden, log_probs, ids_, tail_) in cases.items():
        teacher = (log_probs.astype("float32"), ids_, tail_.astype("f4"))
        expected = dense_bucketed(hidden, kernel, *teacher, ones, 1.0)
        if name != "near":
            check(top_k(*teacher), hidden, kernel, expected)
            continue
        # The float32 rounding of the student's logits (~3e-7) is a
        # relative 3e-3 of u = log(P / q) here.
        value, grads = value_and_grads(top_k(*teacher), hidden, kernel)
        close(value, expected[0], rtol=2e-3)
        for actual, wanted in zip(grads, expected[1:]):
            atol = 1e-2 * np.abs(wanted).max()
            np.testing.assert_allclose(np_(actual), wanted, atol=atol)


def test_masked_garbage_is_ignored_and_bad_ids_give_nan():
    hs, ks, ht, kt, mask, _ = make_inputs(3)
    lp, ids, tail = top_k_teacher(ht.astype("float64") @ kt[:, :V], 4)
    lp, tail = lp.astype("float32"), tail.astype("float32")
    dirty_lp, dirty_ids = lp.copy(), ids.copy()
    dirty_lp[~mask], dirty_ids[~mask] = np.nan, V + 5
    dirty_hs = np.where(mask[..., None], hs, np.nan).astype("float32")
    clean = top_k(lp, ids, tail, mask=mask)(hs, ks)
    close(top_k(dirty_lp, dirty_ids, tail, mask=mask)(dirty_hs, ks), np_(clean))
    ids[0, 0, 1] = -1
    assert np.isnan(np_(top_k(lp, ids, tail)(hs, ks)))


def test_the_cached_temperature_is_checked():
    hs, ks, ht, kt, mask, _ = make_inputs(4)
    lp, ids, tail = top_k_teacher(ht.astype("float64") @ kt[:, :V], 4, 2.0)
    args = (lp.astype("float32"), ids, tail.astype("float32"))
    with pytest.raises(ValueError, match="`temperature`"):
        top_k(*args, teacher_temperature=2.0)(hs, ks)  # T = 1
    plain = top_k(*args, temperature=2.0)(hs, ks)
    for cached in (2.0, 1.0):
        tensor = ops.full((hs.shape[0],), cached, "float32")
        fn = top_k(*args, temperature=2.0, teacher_temperature=tensor)
        value, grads = value_and_grads(fn, hs, ks)
        if cached == 2.0:
            close(value, np_(plain))
        else:  # NaN, and no update
            assert np.isnan(np_(value))
            assert all(np.all(np_(g) == 0) for g in grads)


def test_invalid_arguments():
    hs, ks, _, _, _, _ = make_inputs(5)
    lp = np.zeros(hs.shape[:-1] + (3,), "float32")
    ids, tail = np.zeros(lp.shape, "int32"), lp[..., 0]
    wide = np.zeros(hs.shape[:-1] + (V + 1,), "float32")
    for args, kwargs, name in [
        ((lp, ids[..., :2], tail), {}, "teacher_top_k_ids"),
        ((lp, ids.astype("float32"), tail), {}, "teacher_top_k_ids"),
        ((lp, ids, tail[:1]), {}, "teacher_tail_log_prob"),
        ((wide, wide.astype("int32"), tail), {}, "teacher_top_k_log_probs"),
        ((lp, ids, tail), {"student_kernel_layout": "vv"}, "student_kernel"),
        ((lp, ids, tail), {"chunk_size": 0}, "chunk_size"),
    ]:
        with pytest.raises(ValueError, match=f"`{name}"):
            top_k(*args, **kwargs)(hs, ks)


# ------------------------------------------------ the cache and the models


def test_cache_holds_the_teachers_top_k_and_reloads(tmp_path):
    # An untied teacher with a padded vocabulary; 6 rows in batches of 4.
    teacher = llama(2, 16, vocab=VOCAB + 8, tie=False)
    x, _, _ = batch()
    cache = keras_kd.cache_causal_lm_top_k(
        teacher,
        x,
        k=5,
        path=tmp_path,
        batch_size=4,
        temperature=2.0,
        vocabulary_size=VOCAB,
    )
    logits = logits_of(teacher, x)[..., :VOCAB]
    lp, ids, tail = top_k_teacher(logits, 5, 2.0)
    assert cache["teacher_top_k_log_probs"].dtype == np.float16
    assert cache["teacher_top_k_ids"].dtype == np.int32
    np.testing.assert_array_equal(cache["teacher_top_k_ids"], ids)
    # float16 keeps 11 significant bits.
    np.testing.assert_allclose(
        cache["teacher_top_k_log_probs"], lp, rtol=2**-10, atol=1e-3
    )
    np.testing.assert_allclose(cache["teacher_tail_log_prob"], tail, rtol=1e-5)
    np.testing.assert_array_equal(cache["teacher_temperature"], 2.0)
    loaded = keras_kd.load_causal_lm_top_k(tmp_path)
    assert set(loaded) == set(cache)
    for key, array in loaded.items():
        assert isinstance(array, np.memmap)
        np.testing.assert_array_equal(array, cache[key])


def test_loader_names_the_bad_file(tmp_path):
    teacher = llama(1, 8)
    x, _, _ = batch(n=3)
    keras_kd.cache_causal_lm_top_k(teacher, x, k=2, path=tmp_path)
    ids_file = tmp_path / "teacher_top_k_ids.npy"
    good = ids_file.read_bytes()
    for broken, match in [
        (good[: len(good) - 8], "teacher_top_k_ids.npy"),  # truncated
        (b"not an array", "teacher_top_k_ids.npy"),
    ]:
        ids_file.write_bytes(broken)
        with pytest.raises(ValueError, match=match):
            keras_kd.load_causal_lm_top_k(tmp_path)
    np.save(ids_file, np.zeros((3, 7, 2), "float32"))  # wrong dtype
    with pytest.raises(ValueError, match="teacher_top_k_ids.npy.*dtype"):
        keras_kd.load_causal_lm_top_k(tmp_path)
    ids_file.write_bytes(good)
    np.save(tmp_path / "teacher_tail_log_prob.npy", np.zeros((2, 7), "f4"))
    with pytest.raises(ValueError, match="teacher_tail_log_prob.npy.*shape"):
        keras_kd.load_causal_lm_top_k(tmp_path)
    (tmp_path / "causal_lm_top_k.json").unlink()
    with pytest.raises(ValueError, match="causal_lm_top_k.json.*missing"):
        keras_kd.load_causal_lm_top_k(tmp_path)
    with pytest.raises(ValueError, match="`k`"):
        keras_kd.cache_causal_lm_top_k(teacher, x, k=VOCAB + 1)
    with pytest.raises(ValueError, match="`teacher`"):
        keras_kd.cache_causal_lm_top_k(keras.Sequential(), x, k=2)


def test_offline_step_equals_the_online_step_at_full_vocabulary():
    teacher, student, twin = llama(2, 16), llama(1, 8), llama(1, 8)
    twin.set_weights(student.get_weights())
    x, labels, w = batch()
    # float32 values: the float16 rounding would be the only difference.
    cache = keras_kd.cache_causal_lm_top_k(
        teacher, x, k=VOCAB, temperature=2.0, dtype="float32"
    )
    online = keras_kd.CausalLMDistiller(student, teacher)
    offline = keras_kd.CausalLMDistiller(twin, chunk_size=5)
    logs = []
    for model, inputs in ((online, x), (offline, {**x, **cache})):
        model.compile(
            keras.optimizers.SGD(0.5),
            # The precise path: the top-k buckets are computed without
            # cancellation too.
            distillation_loss=losses.KLDivergence(
                temperature=2.0, precise=True
            ),
            alpha=0.4,
        )
        history = model.fit(
            inputs, labels, sample_weight=w, batch_size=6, verbose=0
        )
        logs.append(history.history)
    for key in ("loss", "student_loss", "distillation_loss"):
        np.testing.assert_allclose(logs[1][key], logs[0][key], rtol=1e-5)
    for a, b in zip(twin.get_weights(), student.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_offline_loss_equals_the_bucketed_reference_at_small_k():
    teacher, student = llama(2, 16), llama(1, 8)
    x, labels, w = batch()
    cache = keras_kd.cache_causal_lm_top_k(teacher, x, k=3, temperature=1.5)
    distiller = keras_kd.CausalLMDistiller(student)
    distiller.compile(
        keras.optimizers.SGD(0.0),
        distillation_loss=losses.KLDivergence(temperature=1.5),
        alpha=0.3,
    )
    logs = distiller.fit(
        {**x, **cache}, labels, sample_weight=w, batch_size=6, verbose=0
    ).history
    logits = logits_of(student, x).astype("float64")
    kl = bucketed_kl(
        logits / 1.5,
        cache["teacher_top_k_log_probs"],
        cache["teacher_top_k_ids"],
        cache["teacher_tail_log_prob"],
    )
    ce = -np.take_along_axis(log_softmax64(logits), labels[..., None], -1)
    real = w > 0
    kd_value, ce_value = 1.5**2 * kl[real].mean(), ce[..., 0][real].mean()
    np.testing.assert_allclose(logs["distillation_loss"][0], kd_value, 1e-5)
    np.testing.assert_allclose(logs["student_loss"][0], ce_value, 1e-5)
    np.testing.assert_allclose(
        logs["loss"][0], 0.3 * ce_value + 0.7 * kd_value, rtol=1e-5
    )
    # Without labels: the divergence alone.
    alone = distiller.fit({**x, **cache}, sample_weight=w, verbose=0)
    np.testing.assert_allclose(alone.history["loss"][0], kd_value, 1e-5)


def test_offline_mode_checks_its_cache_and_loss():
    teacher, student = llama(1, 8), llama(1, 8)
    x, labels, w = batch(n=4)
    cache = keras_kd.cache_causal_lm_top_k(teacher, x, k=4, temperature=2.0)
    distiller = keras_kd.CausalLMDistiller(student)
    with pytest.raises(ValueError, match="`distillation_loss`"):
        distiller.compile("sgd", distillation_loss=losses.ReverseKLDivergence())
    distiller.compile(keras.optimizers.SGD(0.5), alpha=0.5)  # T = 1
    before = student.get_weights()
    logs = distiller.fit({**x, **cache}, labels, sample_weight=w, verbose=0)
    assert np.isnan(logs.history["loss"][0])
    for a, b in zip(before, student.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Last: on JAX a failed `fit` leaves the model's variables released.
    with pytest.raises(ValueError, match="teacher_top_k_log_probs"):
        distiller.fit(x, labels, verbose=0)
