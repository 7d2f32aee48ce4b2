"""ULD and the hybrid distance across vocabularies: dense functions on
logits, the fused chunked op from hidden states and the per-token
log-probabilities, against float64 NumPy references (values, and
gradients by central differences of the reference)."""

import math

import keras
import numpy as np
import pytest
from _cases import log_softmax64
from _fused_linear_cases import close, np_, value_and_grads

from keras_kd import losses as kd_losses
from keras_kd import ops as kd

N, HS, HT, VS, VT = 9, 5, 6, 11, 14


# ------------------------------------------------- float64 NumPy reference


def sorted_l1_64(a, b):
    width = max(a.shape[-1], b.shape[-1])
    a = -np.sort(-a, axis=-1)
    b = -np.sort(-b, axis=-1)
    a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
    b = np.pad(b, [(0, 0)] * (b.ndim - 1) + [(0, width - b.shape[-1])])
    return np.abs(a - b).sum(-1)


def distance64(
    zt, zs, t=1.0, kind="universal", beta=0.5, ids=None, ls=0.0, lt=0.0
):
    """Per-row distance of the student's `exp(ls) softmax(zs / t)` from the
    teacher's, times `t**2`; the hybrid gathers the unmatched ids (rather
    than zeroing them, as the library does)."""
    zt, zs = np.asarray(zt, "float64"), np.asarray(zs, "float64")
    log_a = log_softmax64(zs / t) + np.expand_dims(ls, -1)
    log_b = log_softmax64(zt / t) + np.expand_dims(lt, -1)
    a, b = np.exp(log_a), np.exp(log_b)
    if kind == "universal":
        return t * t * sorted_l1_64(a, b)
    if ids is None:
        ids = (np.arange(zs.shape[-1]), np.arange(zt.shape[-1]))
    s_ids, t_ids = ids
    q, p = a[..., s_ids], b[..., t_ids]
    if beta == 0.0:
        exact = p * np.log(p / q) - p + q
    elif beta == 1.0:
        exact = q * np.log(q / p) - q + p
    else:
        m = beta * p + (1 - beta) * q
        exact = beta * p * np.log(p / m) + (1 - beta) * q * np.log(q / m)
    rest_s = np.setdiff1d(np.arange(zs.shape[-1]), s_ids)
    rest_t = np.setdiff1d(np.arange(zt.shape[-1]), t_ids)
    rest = sorted_l1_64(a[..., rest_s], b[..., rest_t])
    return t * t * (exact.sum(-1) + rest)


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar `f` at float64 `x`."""
    x = np.asarray(x, "float64")
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += eps
        down[i] -= eps
        grad[i] = (f(up) - f(down)) / (2 * eps)
    return grad


def random_match(rng, count=6):
    s_ids = np.sort(rng.choice(VS, count, replace=False))
    t_ids = rng.choice(VT, count, replace=False)
    return s_ids, t_ids


def fused_inputs(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "hs": rng.normal(size=(N, HS)).astype("float32"),
        "ks": rng.normal(size=(HS, VS)).astype("float32"),
        "ht": rng.normal(size=(N, HT)).astype("float32"),
        "kt": rng.normal(size=(HT, VT)).astype("float32"),
        "ls": (-rng.random(N) * 2.0).astype("float32"),
        "lt": (-rng.random(N) * 2.0).astype("float32"),
        "mask": rng.random(N) > 0.3,
        "match": random_match(rng),
    }


def fused_reference(d, kind, beta, t, caps=(None, None), sizes=(VS, VT)):
    """Loss and its gradients w.r.t. the student's hidden states, kernel
    and log-scale, in float64."""
    hs, ks = d["hs"].astype("float64"), d["ks"].astype("float64")[:, : sizes[0]]
    ht, kt = d["ht"].astype("float64"), d["kt"].astype("float64")[:, : sizes[1]]
    w = d["mask"].astype("float64") / d["mask"].sum()
    zt = ht @ kt
    if caps[1]:
        zt = caps[1] * np.tanh(zt / caps[1])
    ids = d["match"] if sizes == (VS, VT) else None

    def loss(zs, ls):
        rows = distance64(zt, zs, t, kind, beta, ids, ls, d["lt"])
        return (w * rows).sum()

    raw = hs @ ks
    zs = caps[0] * np.tanh(raw / caps[0]) if caps[0] else raw
    ls = d["ls"].astype("float64")
    g_z = numeric_grad(lambda z: loss(z, ls), zs)
    g_l = numeric_grad(lambda s: loss(zs, s), ls)
    if caps[0]:
        g_z = g_z * (1 - np.tanh(raw / caps[0]) ** 2)
    g_k = np.zeros(d["ks"].shape)
    g_k[:, : sizes[0]] = hs.T @ g_z
    return loss(zs, ls), g_z @ ks.T, g_k, g_l


# ---------------------------------------------------------- dense on logits


@pytest.mark.parametrize("shape", [((3, 4, VT), (3, 4, VS)), ((5, 7), (5, 12))])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_universal_matches_the_float64_reference(shape, temperature):
    rng = np.random.default_rng(1)
    zt = (rng.normal(size=shape[0]) * 3).astype("float32")
    zs = (rng.normal(size=shape[1]) * 3).astype("float32")
    got = kd.universal_logit_distance(zt, zs, temperature)
    close(got, distance64(zt, zs, temperature), rtol=1e-5)
    assert np_(got).shape == shape[0][:-1]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_matches_the_float64_reference(beta):
    rng = np.random.default_rng(2)
    zt = (rng.normal(size=(4, VT)) * 2).astype("float32")
    zs = (rng.normal(size=(4, VS)) * 2).astype("float32")
    ids = random_match(rng)
    got = kd.hybrid_logit_distance(zt, zs, beta, 1.5, matched_ids=ids)
    close(got, distance64(zt, zs, 1.5, "hybrid", beta, ids), rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_hybrid_over_one_vocabulary_is_the_jsd(beta):
    rng = np.random.default_rng(3)
    zt = (rng.normal(size=(6, VS)) * 3).astype("float32")
    zs = (rng.normal(size=(6, VS)) * 3).astype("float32")
    hybrid = np_(kd.hybrid_logit_distance(zt, zs, beta, 2.0))
    jsd = np_(kd.jensen_shannon_divergence(zt, zs, beta, temperature=2.0))
    np.testing.assert_allclose(hybrid, jsd, rtol=1e-5, atol=1e-6)


def test_dense_gradients_match_central_differences():
    rng = np.random.default_rng(4)
    zt = (rng.normal(size=(3, VT)) * 2).astype("float32")
    zs = (rng.normal(size=(3, VS)) * 2).astype("float32")
    ids = random_match(rng)
    for kind, fn in (
        ("universal", lambda t, s: kd.universal_logit_distance(t, s, 1.5)),
        ("hybrid", lambda t, s: kd.hybrid_logit_distance(t, s, 0.3, 1.5, ids)),
    ):
        _, (grad,) = value_and_grads(
            lambda t, s: keras.ops.sum(fn(t, s)), zt, zs, wrt=(1,)
        )
        expected = numeric_grad(
            lambda s: distance64(zt, s, 1.5, kind, 0.3, ids).sum(), zs
        )
        close(grad, expected, rtol=1e-4)


def test_masked_entries_carry_no_mass_and_nan_reaches_its_row():
    zt = np.array([[0.0, 1.0, -np.inf, 2.0], [1.0, np.nan, 0.0, 0.0]])
    zs = np.array([[0.5, -np.inf, 1.0], [0.0, 1.0, 2.0]])
    zt, zs = zt.astype("float32"), zs.astype("float32")
    uld = np_(kd.universal_logit_distance(zt, zs))
    assert np.isfinite(uld[0]) and np.isnan(uld[1])
    finite = np.where(np.isinf(zt[:1]), -1e30, zt[:1])
    close(
        uld[:1],
        distance64(finite, np.where(np.isinf(zs[:1]), -1e30, zs[:1])),
        rtol=1e-5,
    )
    ids = (np.array([0, 1, 2]), np.array([0, 2, 3]))
    hybrid = np_(kd.hybrid_logit_distance(zt, zs, 0.5, matched_ids=ids))
    assert np.isfinite(hybrid[0]) and np.isnan(hybrid[1])
    _, (grad,) = value_and_grads(
        lambda s: keras.ops.sum(
            kd.hybrid_logit_distance(zt[:1], s, 0.5, matched_ids=ids)
        ),
        zs[:1],
        wrt=(0,),
    )
    assert np.all(np.isfinite(np_(grad)))


def test_bad_arguments_raise_a_value_error_naming_them():
    zt, zs = np.zeros((2, VT), "float32"), np.zeros((2, VS), "float32")
    with pytest.raises(ValueError, match="matched_ids"):
        kd.hybrid_logit_distance(zt, zs)  # two vocabularies, no match
    with pytest.raises(ValueError, match="matched_ids"):
        kd.hybrid_logit_distance(zt, zs, matched_ids=([0, 0], [1, 2]))
    with pytest.raises(ValueError, match="matched_ids"):
        kd.hybrid_logit_distance(zt, zs, matched_ids=([0, VS], [1, 2]))
    with pytest.raises(ValueError, match="y_true"):
        kd.universal_logit_distance(zt, np.zeros((3, VS), "float32"))
    with pytest.raises(ValueError, match="temperature"):
        kd.universal_logit_distance(zt, zs, temperature=0.0)
    with pytest.raises(ValueError, match="beta"):
        kd.hybrid_logit_distance(zt, zt, beta=1.5)


# ----------------------------------------------------- fused from hidden states


def _fused(d, kind, beta, t, chunk, **kwargs):
    def fn(hs, ks, ls):
        return kd.fused_linear_logit_distance(
            hs,
            ks,
            d["ht"],
            d["kt"],
            mask=d["mask"],
            distance=kind,
            beta=beta,
            temperature=t,
            student_log_scale=ls,
            teacher_log_scale=d["lt"],
            matched_ids=d["match"] if kind == "hybrid" else None,
            chunk_size=chunk,
            **kwargs,
        )

    return fn


@pytest.mark.parametrize(
    "kind,beta",
    [("universal", 0.5), ("hybrid", 0.0), ("hybrid", 0.3), ("hybrid", 1.0)],
)
@pytest.mark.parametrize("chunk", [2, None])
def test_fused_matches_the_reference_in_value_and_gradients(kind, beta, chunk):
    d = fused_inputs()
    value, grads = value_and_grads(
        _fused(d, kind, beta, 1.5, chunk),
        d["hs"],
        d["ks"],
        d["ls"],
        wrt=(0, 1, 2),
    )
    expected = fused_reference(d, kind, beta, 1.5)
    close(value, expected[0], rtol=1e-5)
    for got, wanted in zip(grads, expected[1:]):
        close(got, wanted, rtol=1e-4)


def test_fused_soft_caps_layouts_and_padded_vocabularies():
    d = fused_inputs(seed=5)
    caps = (3.0, 2.0)
    sizes = (VS - 2, VT - 3)

    def fn(hs, ks, ls):
        return kd.fused_linear_logit_distance(
            hs,
            keras.ops.transpose(ks),
            d["ht"],
            np.ascontiguousarray(d["kt"].T),
            mask=d["mask"],
            distance="universal",
            temperature=0.7,
            student_log_scale=ls,
            teacher_log_scale=d["lt"],
            chunk_size=4,
            student_kernel_layout="vh",
            teacher_kernel_layout="vh",
            student_logit_soft_cap=caps[0],
            teacher_logit_soft_cap=caps[1],
            student_vocabulary_size=sizes[0],
            teacher_vocabulary_size=sizes[1],
        )

    value, grads = value_and_grads(fn, d["hs"], d["ks"], d["ls"], wrt=(0, 1, 2))
    expected = fused_reference(d, "universal", 0.5, 0.7, caps, sizes)
    close(value, expected[0], rtol=1e-5)
    for got, wanted in zip(grads, expected[1:]):
        close(got, wanted, rtol=1e-4)


def test_fused_over_one_vocabulary_is_the_fused_jsd():
    rng = np.random.default_rng(6)
    hs = rng.normal(size=(2, 5, HS)).astype("float32")
    ks = rng.normal(size=(HS, VS)).astype("float32")
    ht = rng.normal(size=(2, 5, HT)).astype("float32")
    kt = rng.normal(size=(HT, VS)).astype("float32")
    mask = rng.random((2, 5)) > 0.2
    for beta in (0.0, 0.4, 1.0):
        hybrid = kd.fused_linear_logit_distance(
            hs,
            ks,
            ht,
            kt,
            mask=mask,
            distance="hybrid",
            beta=beta,
            temperature=2.0,
        )
        jsd = kd.fused_linear_divergence(
            hs,
            ks,
            ht,
            kt,
            mask=mask,
            divergence="jsd",
            beta=beta,
            temperature=2.0,
        )
        close(hybrid, float(np_(jsd)), rtol=1e-5)


def test_fused_ignores_masked_rows_even_when_nan():
    d = fused_inputs(seed=7)
    d["hs"][~d["mask"]] = np.nan
    d["ls"][~d["mask"]] = np.nan
    value, grads = value_and_grads(
        _fused(d, "hybrid", 0.5, 1.0, 3),
        d["hs"],
        d["ks"],
        d["ls"],
        wrt=(0, 1, 2),
    )
    assert np.isfinite(float(np_(value)))
    assert all(np.all(np.isfinite(np_(g))) for g in grads)
    none = dict(d, mask=np.zeros(N, bool))
    assert (
        float(
            np_(
                _fused(none, "universal", 0.5, 1.0, 3)(
                    d["hs"], d["ks"], d["ls"]
                )
            )
        )
        == 0.0
    )


def test_fused_bad_arguments_raise():
    d = fused_inputs()
    with pytest.raises(ValueError, match="distance"):
        _fused(d, "kl", 0.5, 1.0, None)(d["hs"], d["ks"], d["ls"])
    with pytest.raises(ValueError, match="teacher_hidden"):
        kd.fused_linear_logit_distance(d["hs"], d["ks"], d["ht"][:3], d["kt"])
    with pytest.raises(ValueError, match="matched_ids"):
        kd.fused_linear_logit_distance(
            d["hs"], d["ks"], d["ht"], d["kt"], distance="hybrid"
        )
    with pytest.raises(ValueError, match="teacher_kernel"):
        kd.fused_linear_logit_distance(
            d["hs"], d["ks"], d["ht"], d["kt"], teacher_vocabulary_size=VT + 1
        )


# --------------------------------------------------- token log-probabilities


@pytest.mark.parametrize("chunk", [3, None])
def test_token_log_probs_values_and_gradients(chunk):
    rng = np.random.default_rng(8)
    hs = rng.normal(size=(2, 6, HS)).astype("float32")
    ks = rng.normal(size=(HS, VS)).astype("float32")
    labels = rng.integers(0, VS, size=(2, 6))
    mask = rng.random((2, 6)) > 0.3
    up = rng.normal(size=(2, 6)).astype("float32")

    def fn(h, k):
        out = kd.fused_linear_token_log_probs(
            h, k, labels, mask=mask, chunk_size=chunk, logit_soft_cap=4.0
        )
        return keras.ops.sum(keras.ops.multiply(out, up))

    raw = hs.astype("float64") @ ks
    z = 4.0 * np.tanh(raw / 4.0)
    log_p = np.take_along_axis(log_softmax64(z), labels[..., None], -1)[..., 0]
    log_p = np.where(mask, log_p, 0.0)
    got = kd.fused_linear_token_log_probs(
        hs, ks, labels, mask=mask, chunk_size=chunk, logit_soft_cap=4.0
    )
    close(got, log_p, rtol=1e-5)
    onehot = np.eye(VS)[labels]
    g_z = (onehot - np.exp(log_softmax64(z))) * (up * mask)[..., None]
    g_z = g_z * (1 - np.tanh(raw / 4.0) ** 2)
    _, grads = value_and_grads(fn, hs, ks)
    close(grads[0], g_z @ ks.T.astype("float64"), rtol=1e-4)
    close(grads[1], hs.reshape(-1, HS).T @ g_z.reshape(-1, VS), rtol=1e-4)


def test_token_log_probs_of_a_label_out_of_range_is_nan():
    hs = np.ones((1, 3, HS), "float32")
    ks = np.zeros((HS, VS), "float32")
    out = np_(kd.fused_linear_token_log_probs(hs, ks, np.array([[0, VS, 2]])))
    assert np.isnan(out[0, 1]) and np.allclose(out[0, [0, 2]], -math.log(VS))


# ------------------------------------------------------------ loss classes


@pytest.mark.parametrize(
    "loss",
    [
        kd_losses.UniversalLogitDistance(temperature=2.0),
        kd_losses.HybridLogitDistance(beta=0.3, temperature=2.0),
    ],
)
def test_loss_classes_average_the_op_and_round_trip(loss):
    rng = np.random.default_rng(9)
    zt = rng.normal(size=(4, VS)).astype("float32")
    zs = rng.normal(size=(4, VS)).astype("float32")
    fn = (
        kd.universal_logit_distance
        if loss.distance == "universal"
        else lambda t, s, temperature: kd.hybrid_logit_distance(
            t, s, 0.3, temperature
        )
    )
    close(loss(zt, zs), np_(fn(zt, zs, temperature=2.0)).mean(), rtol=1e-6)
    again = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(again) is type(loss)
    assert again.get_config() == loss.get_config()
    close(again(zt, zs), np_(loss(zt, zs)), rtol=1e-7)
