"""Every way a keras-hub `CausalLM` turns hidden states into logits is
either honoured exactly by the fused heads or refused with a clear error:
a task-level soft cap (Gemma 4's `final_logit_cap`) is computed, a
quantized head or a doubly capped one is refused."""

import keras
import numpy as np
import pytest

import keras_kd
from keras_kd import losses

keras_hub = pytest.importorskip("keras_hub")

from test_causal_lm import batch, dense_reference, llama  # noqa: E402

VOCAB = 40


def gemma4(hidden, final_logit_cap=None, final_logit_soft_cap=None):
    backbone = keras_hub.models.Gemma4Backbone(
        vocabulary_size=VOCAB,
        image_size=16,
        num_layers=1,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        head_dim=4,
        sliding_window_size=4,
        final_logit_soft_cap=final_logit_soft_cap,
    )
    return keras_hub.models.Gemma4CausalLM(
        backbone=backbone, preprocessor=None, final_logit_cap=final_logit_cap
    )


def test_task_level_soft_cap_is_computed():
    # Caps small enough to bend the logits of these random models.
    teacher, student = gemma4(16, final_logit_cap=0.5), gemma4(8, 0.3)
    x, labels, w = batch()
    x["position_ids"] = np.broadcast_to(
        np.arange(x["token_ids"].shape[1], dtype="int32"), x["token_ids"].shape
    ).copy()
    loss = losses.KLDivergence(temperature=2.0)
    distiller = keras_kd.CausalLMDistiller(student, teacher, chunk_size=5)
    distiller.compile(keras.optimizers.SGD(0.0), distillation_loss=loss)
    logs = distiller.fit(
        x, labels, sample_weight=w, batch_size=len(w), verbose=0
    ).history
    total, ce, kd = dense_reference(
        student, teacher, x, labels, w, "kl", 2.0, 0.1
    )
    np.testing.assert_allclose(logs["student_loss"][0], ce, rtol=1e-5)
    np.testing.assert_allclose(
        logs["distillation_loss"][0], kd, rtol=2e-4, atol=1e-7
    )
    # The cap matters: without it the divergence would be another number.
    uncapped = gemma4(16)
    uncapped.set_weights(teacher.get_weights())
    _, _, other = dense_reference(
        student, uncapped, x, labels, w, "kl", 2.0, 0.1
    )
    assert abs(other - kd) > 1e-3 * kd


def test_two_soft_caps_are_refused():
    capped_twice = gemma4(8, final_logit_cap=3.0, final_logit_soft_cap=5.0)
    with pytest.raises(ValueError, match="`teacher`.*at most one soft cap"):
        keras_kd.CausalLMDistiller(gemma4(8), capped_twice)


@pytest.mark.parametrize("tie", [True, False])
def test_a_quantized_head_is_refused(tie):
    teacher, student = llama(1, 16, tie=tie), llama(1, 8)
    teacher.quantize("int8")
    with pytest.raises(ValueError, match="`teacher`.*not quantized"):
        keras_kd.CausalLMDistiller(student, teacher)
    with pytest.raises(ValueError, match="`teacher`.*not quantized"):
        keras_kd.cache_causal_lm_top_k(teacher, batch()[0], k=4)
    # Quantized after the distiller was built: refused at the first batch.
    teacher, student = llama(1, 16, tie=tie), llama(1, 8)
    distiller = keras_kd.CausalLMDistiller(student, teacher)
    distiller.compile("sgd")
    student.quantize("int8")
    x, labels, w = batch()
    with pytest.raises(ValueError, match="`student`.*not quantized"):
        distiller.fit(x, labels, sample_weight=w, verbose=0)
