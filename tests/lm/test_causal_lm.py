"""CausalLMDistiller on small keras-hub models built from their
constructors: the fused loss equals the dense computation in value and in
the training step, the teacher stays frozen, the student stays a plain
keras-hub model."""

import importlib.util

import keras
import numpy as np
import pytest
from _cases import log_softmax64
from keras import ops

import keras_kd
from keras_kd import losses

keras_hub = pytest.importorskip("keras_hub")

VOCAB = 40


def llama(layers, hidden, vocab=VOCAB, tie=True, name=None):
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocab,
        num_layers=layers,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        tie_word_embeddings=tie,
    )
    return keras_hub.models.LlamaCausalLM(
        backbone=backbone, preprocessor=None, name=name
    )


def batch(n=6, length=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, (n, length)).astype("int32")
    padding = np.ones((n, length), "int32")
    for i in range(n):
        padding[i, length - 1 - i % 3 :] = 0
    labels = np.roll(tokens, -1, axis=1)
    x = {"token_ids": tokens * padding, "padding_mask": padding}
    return x, labels, padding.astype("float32")


def logits(model, x):
    """A keras-hub model's logits by a direct call: its own `predict`,
    `fit` and `evaluate` build their datasets with tensorflow or grain,
    which a torch- or JAX-only machine may lack."""
    return ops.convert_to_numpy(model(x))


def dense_reference(student, teacher, x, labels, w, kind, t, alpha, beta=0.5):
    s_logits = logits(student, x)
    t_logits = logits(teacher, x)[..., :VOCAB]
    log_q, log_p = log_softmax64(s_logits / t), log_softmax64(t_logits / t)
    p, q = np.exp(log_p), np.exp(log_q)
    if kind == "kl":
        d = (p * (log_p - log_q)).sum(-1)
    elif kind == "reverse_kl":
        d = (q * (log_q - log_p)).sum(-1)
    else:
        log_m = np.log(beta * p + (1 - beta) * q)
        d = beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (
            q * (log_q - log_m)
        ).sum(-1)
    ce = -np.take_along_axis(log_softmax64(s_logits), labels[..., None], -1)
    real = w > 0
    kd = t * t * d[real].mean()
    ce = ce[..., 0][real].mean()
    return alpha * ce + (1 - alpha) * kd, ce, kd


@pytest.mark.parametrize(
    "loss,kind",
    [
        (losses.KLDivergence(temperature=2.0), "kl"),
        (losses.ReverseKLDivergence(temperature=1.5), "reverse_kl"),
        (losses.JensenShannonDivergence(beta=0.3, temperature=2.0), "jsd"),
    ],
)
def test_logged_terms_equal_the_dense_computation(loss, kind):
    # The teacher is untied and has a padded vocabulary.
    teacher = llama(2, 16, vocab=VOCAB + 8, tie=False)
    student = llama(1, 8)
    x, labels, w = batch()
    distiller = keras_kd.CausalLMDistiller(student, teacher, chunk_size=5)
    distiller.compile(
        keras.optimizers.SGD(0.0), distillation_loss=loss, alpha=0.3
    )
    logs = distiller.fit(
        x, labels, sample_weight=w, batch_size=len(w), verbose=0
    ).history
    total, ce, kd = dense_reference(
        student,
        teacher,
        x,
        labels,
        w,
        kind,
        loss.temperature,
        0.3,
        getattr(loss, "beta", 0.5),
    )
    np.testing.assert_allclose(logs["student_loss"][0], ce, rtol=1e-5)
    np.testing.assert_allclose(
        logs["distillation_loss"][0], kd, rtol=2e-4, atol=1e-7
    )
    np.testing.assert_allclose(logs["loss"][0], total, rtol=1e-5)


def test_training_step_equals_a_dense_distiller_step():
    teacher, student = llama(2, 16), llama(1, 8)
    twin = llama(1, 8)
    twin.set_weights(student.get_weights())
    x, labels, w = batch()
    fused = keras_kd.CausalLMDistiller(student, teacher)
    fused.compile(
        keras.optimizers.SGD(0.5),
        distillation_loss=losses.KLDivergence(temperature=2.0),
        alpha=0.4,
    )
    dense = keras_kd.Distiller(twin, teacher)
    dense.compile(
        keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="mean_with_sample_weight"
        ),
        distillation_loss=losses.KLDivergence(
            temperature=2.0, reduction="mean_with_sample_weight"
        ),
        alpha=0.4,
    )
    before = [np.array(v) for v in teacher.get_weights()]
    for model in (fused, dense):
        model.fit(x, labels, sample_weight=w, batch_size=len(w), verbose=0)
    moved = max(
        float(np.abs(a - b).max())
        for a, b in zip(student.get_weights(), llama(1, 8).get_weights())
    )
    assert moved > 1e-4
    for a, b in zip(student.get_weights(), twin.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(before, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_without_labels_the_divergence_alone(tmp_path):
    teacher, student = llama(2, 16), llama(1, 8, tie=False)
    x, labels, w = batch()
    distiller = keras_kd.CausalLMDistiller(student, teacher)
    distiller.compile(keras.optimizers.SGD(0.0))
    logs = distiller.fit(x, sample_weight=w, batch_size=len(w), verbose=0)
    logs = logs.history
    assert "student_loss" not in logs or logs["student_loss"][0] == 0.0
    _, _, kd = dense_reference(student, teacher, x, labels, w, "kl", 1.0, 0)
    np.testing.assert_allclose(logs["loss"][0], kd, rtol=2e-4, atol=1e-7)
    # The student is a plain keras-hub model, saved and reloaded as one.
    path = tmp_path / "student.keras"
    distiller.student.save(path)
    reloaded = keras.saving.load_model(path)
    assert type(reloaded) is type(student)
    np.testing.assert_allclose(
        logits(reloaded, x),
        logits(student, x),
        rtol=1e-5,
        atol=1e-6,
    )


def test_invalid_arguments():
    teacher, student = llama(1, 8), llama(1, 8)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="`teacher`"):
        keras_kd.CausalLMDistiller(student, plain)
    with pytest.raises(ValueError, match="`chunk_size`"):
        keras_kd.CausalLMDistiller(student, teacher, chunk_size=0)
    distiller = keras_kd.CausalLMDistiller(student, teacher)
    with pytest.raises(ValueError, match="`loss`"):
        distiller.compile("sgd", loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match="`metrics`"):
        distiller.compile("sgd", metrics=["accuracy"])
    with pytest.raises(ValueError, match="`distillation_loss`"):
        distiller.compile(
            "sgd", distillation_loss=losses.SymmetricKLDivergence()
        )


@pytest.mark.skipif(
    not any(importlib.util.find_spec(m) for m in ("tensorflow", "grain")),
    reason="the example trains with keras-hub's own fit and evaluate, "
    "whose datasets need tensorflow or grain",
)
def test_example_runs_and_reports_perplexities():
    from pathlib import Path

    path = Path(__file__).parents[2] / "examples" / "causal_lm_distill.py"
    spec = importlib.util.spec_from_file_location("causal_lm_distill", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    results = example.main(["--epochs", "1", "--length", "24"])
    assert set(results) == {
        "teacher",
        "student (scratch)",
        "student (distilled)",
    }
    # A character model beats guessing among ~90 symbols after one epoch.
    assert all(1.0 < value < 60.0 for value in results.values())


def test_same_layer_names_in_teacher_and_student_train_like_the_student():
    # Keras' PyTorch backend registers a model's parameters by variable
    # path, where two keras-hub backbones collide: torch's own zero_grad
    # then missed student parameters, whose gradients added up over steps.
    teacher, student, alone = llama(2, 16), llama(1, 8), llama(1, 8)
    alone.set_weights(student.get_weights())
    x, labels, _ = batch(n=8)
    distiller = keras_kd.Distiller(student, teacher)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    distiller.compile(keras.optimizers.SGD(0.5), loss=ce, alpha=1.0)
    # The same layers behind a plain functional model (see `logits`).
    plain = keras.Model(alone.inputs, alone.outputs)
    plain.compile(keras.optimizers.SGD(0.5), loss=ce, weighted_metrics=[])
    for model in (distiller, plain):
        model.fit(x, labels, batch_size=4, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(student.get_weights(), alone.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution on JAX"
)
def test_data_and_model_parallel_match_one_device():
    run_on_eight_devices("_causal_lm_distributed.py")


def run_on_eight_devices(script):
    """Runs `script` (beside this file) on 8 virtual JAX CPU devices; it
    prints "matches one device" when its checks pass."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).parent
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        # Kept: a machine may find keras itself through PYTHONPATH.
        PYTHONPATH=os.pathsep.join(
            [
                str(here),
                str(here.parent),
                *filter(None, [os.environ.get("PYTHONPATH")]),
            ]
        ),
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    result = subprocess.run(
        [sys.executable, str(here / script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "matches one device" in result.stdout
