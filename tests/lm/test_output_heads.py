"""Every way a keras-hub `CausalLM` turns hidden states into logits is
either honoured exactly by the fused heads or refused with a clear error:
every decoder-only model's head (tied or untied, with an embedding or a
task-level soft cap, in float32 or bfloat16) gives the model's own logits;
a quantized head, a doubly capped one, and models whose logits are not
`token_embedding(backbone(x), reverse=True)` (RWKV-7, PaliGemma, BLIP-2,
Gemma 3n, Gemma 4's MTP assistant, encoder-decoders) are refused."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_kd
from keras_kd import losses
from keras_kd.lm._keras_hub import output_head

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


# Every decoder-only keras-hub CausalLM whose logits are the backbone's
# output through `backbone.token_embedding` in reverse (and a cap), tiny.
def _small(**sizes):
    return dict(vocabulary_size=VOCAB, num_layers=1, hidden_dim=8, **sizes)


_ATTENTION = dict(num_query_heads=2, num_key_value_heads=1)
_FFW = dict(intermediate_dim=16)
_QWEN3_5 = dict(
    num_query_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    layer_types=["full_attention"],
    linear_num_key_heads=1,
    linear_num_value_heads=1,
    linear_key_head_dim=4,
    linear_value_head_dim=4,
)
_MOE = dict(num_experts=2, top_k=1)
HEADS = {
    "Llama tied": lambda m: (
        m.LlamaBackbone(
            **_small(**_ATTENTION, **_FFW, tie_word_embeddings=True)
        ),
        m.LlamaCausalLM,
    ),
    "Llama untied": lambda m: (
        m.LlamaBackbone(**_small(**_ATTENTION, **_FFW)),
        m.LlamaCausalLM,
    ),
    "Bloom": lambda m: (
        m.BloomBackbone(**_small(num_heads=2, **_FFW)),
        m.BloomCausalLM,
    ),
    "Falcon": lambda m: (
        m.FalconBackbone(**_small(num_attention_heads=2, **_FFW)),
        m.FalconCausalLM,
    ),
    "Gemma 2 (embedding cap)": lambda m: (
        m.GemmaBackbone(
            **_small(**_ATTENTION, **_FFW, head_dim=4, final_logit_soft_cap=0.5)
        ),
        m.GemmaCausalLM,
    ),
    "Gemma 3 (embedding cap)": lambda m: (
        m.Gemma3Backbone(
            **_small(**_ATTENTION, **_FFW, head_dim=4, image_size=16),
            final_logit_soft_cap=0.5,
        ),
        m.Gemma3CausalLM,
    ),
    "GPT-2": lambda m: (
        m.GPT2Backbone(**_small(num_heads=2, **_FFW, max_sequence_length=16)),
        m.GPT2CausalLM,
    ),
    "GPT-NeoX": lambda m: (
        m.GPTNeoXBackbone(**_small(num_heads=2, **_FFW, rotary_percentage=0.5)),
        m.GPTNeoXCausalLM,
    ),
    "GPT-OSS": lambda m: (
        m.GptOssBackbone(**_small(**_ATTENTION, **_FFW, **_MOE, head_dim=4)),
        m.GptOssCausalLM,
    ),
    "Mistral": lambda m: (
        m.MistralBackbone(**_small(**_ATTENTION, **_FFW)),
        m.MistralCausalLM,
    ),
    "Mixtral": lambda m: (
        m.MixtralBackbone(**_small(**_ATTENTION, **_FFW, **_MOE)),
        m.MixtralCausalLM,
    ),
    "OPT": lambda m: (
        m.OPTBackbone(**_small(num_heads=2, **_FFW, max_sequence_length=16)),
        m.OPTCausalLM,
    ),
    "Phi-3": lambda m: (
        m.Phi3Backbone(**_small(**_ATTENTION, **_FFW)),
        m.Phi3CausalLM,
    ),
    "Qwen": lambda m: (
        m.QwenBackbone(**_small(**_ATTENTION, **_FFW)),
        m.QwenCausalLM,
    ),
    "Qwen MoE": lambda m: (
        m.QwenMoeBackbone(
            **_small(**_ATTENTION, **_FFW, **_MOE),
            moe_intermediate_dim=8,
            shared_expert_intermediate_dim=8,
        ),
        m.QwenMoeCausalLM,
    ),
    "Qwen 3": lambda m: (
        m.Qwen3Backbone(**_small(**_ATTENTION, **_FFW, head_dim=4)),
        m.Qwen3CausalLM,
    ),
    "Qwen 3 MoE": lambda m: (
        m.Qwen3MoeBackbone(
            **_small(**_ATTENTION, **_FFW, **_MOE, head_dim=4),
            moe_intermediate_dim=8,
        ),
        m.Qwen3MoeCausalLM,
    ),
    "Qwen 3.5": lambda m: (
        m.Qwen3_5Backbone(**_small(**_QWEN3_5, **_FFW)),
        m.Qwen3_5CausalLM,
    ),
    "Qwen 3.5 MoE": lambda m: (
        m.Qwen3_5MoeBackbone(
            **_small(**_QWEN3_5, **_MOE),
            moe_intermediate_dim=8,
            shared_expert_intermediate_size=8,
        ),
        m.Qwen3_5MoeCausalLM,
    ),
    "SmolLM3": lambda m: (
        m.SmolLM3Backbone(
            **_small(num_attention_heads=2, num_key_value_heads=1, **_FFW),
            attention_bias=False,
            attention_dropout=0.0,
            rope_layer_enabled_list=[True],
            layer_types=["attention"],
            mlp_bias=False,
            layer_norm_epsilon=1e-6,
            max_position_embeddings=32,
            rope_theta=10000.0,
            partial_rotary_factor=1.0,
        ),
        m.SmolLM3CausalLM,
    ),
}


def head_logits(model, x, name="model"):
    """`soft_cap(hidden @ kernel)` in float64 from `output_head`."""
    kernel, layout, cap = output_head(model, name)
    hidden = model.backbone(x)
    hidden = ops.convert_to_numpy(ops.cast(hidden, "float32"))
    kernel = ops.convert_to_numpy(ops.cast(kernel, "float32"))
    z = hidden.astype("float64") @ (kernel.T if layout == "vh" else kernel)
    return z if cap is None else cap * np.tanh(z / cap)


def own_logits(model, x):
    return ops.convert_to_numpy(ops.cast(model(x), "float32"))


@pytest.mark.parametrize("kind", sorted(HEADS))
def test_every_head_gives_the_models_own_logits(kind):
    backbone, task = HEADS[kind](keras_hub.models)
    model = task(backbone=backbone, preprocessor=None)
    x = batch(n=2, length=5)[0]
    np.testing.assert_allclose(
        head_logits(model, x), own_logits(model, x), rtol=1e-5, atol=1e-6
    )


def test_the_task_level_soft_cap_gives_the_models_own_logits():
    model = gemma4(8, final_logit_cap=0.5)
    x = batch(n=2, length=5)[0]
    x["position_ids"] = np.broadcast_to(
        np.arange(5, dtype="int32"), x["token_ids"].shape
    ).copy()
    np.testing.assert_allclose(
        head_logits(model, x), own_logits(model, x), rtol=1e-5, atol=1e-6
    )


def low_precision(hidden, dtype):
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        hidden_dim=hidden,
        intermediate_dim=2 * hidden,
        dtype=dtype,
        **_ATTENTION,
    )
    return keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)


@pytest.mark.parametrize("dtype", ["bfloat16", "mixed_bfloat16"])
def test_a_low_precision_head_gives_the_models_own_logits(dtype):
    # The kernel comes back as it is (bfloat16, or the float32 variable of
    # a mixed policy) and the fused kernels take it as the model's own head
    # does: from bfloat16 hidden states, to within bfloat16 rounding.
    teacher, student = low_precision(16, dtype), low_precision(8, dtype)
    x, labels, w = batch()
    logits = own_logits(teacher, x)
    scale = np.abs(logits).max()
    np.testing.assert_allclose(
        head_logits(teacher, x), logits, rtol=0, atol=8e-3 * scale
    )
    distiller = keras_kd.CausalLMDistiller(student, teacher, chunk_size=5)
    distiller.compile(keras.optimizers.SGD(0.0), alpha=0.5)
    logs = distiller.fit(
        x, labels, sample_weight=w, batch_size=len(w), verbose=0
    ).history
    _, ce, kd = dense_reference(student, teacher, x, labels, w, "kl", 1.0, 0.5)
    np.testing.assert_allclose(logs["student_loss"][0], ce, rtol=1e-3)
    np.testing.assert_allclose(logs["distillation_loss"][0], kd, rtol=1e-2)


def rwkv7(m):
    backbone = m.RWKV7Backbone(
        hidden_size=8,
        head_size=4,
        num_layers=1,
        vocabulary_size=VOCAB,
        intermediate_dim=16,
        gate_lora=4,
        mv_lora=4,
        aaa_lora=4,
        decay_lora=4,
    )
    return m.RWKV7CausalLM(backbone=backbone, preprocessor=None)


def pali_gemma(m):
    backbone = m.PaliGemmaBackbone(
        **_small(**_ATTENTION, **_FFW, head_dim=4, image_size=16),
        vit_patch_size=8,
        vit_num_heads=1,
        vit_hidden_dim=8,
        vit_num_layers=1,
    )
    return m.PaliGemmaCausalLM(backbone=backbone, preprocessor=None)


def blip2(m):
    vision = m.BLIP2VisionEncoder(
        image_size=16,
        patch_size=8,
        num_layers=1,
        num_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        use_patch_bias=True,
        use_class_token=True,
        use_mha_bias=True,
        use_mlp_bias=True,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        initializer_range=0.02,
    )
    qformer = m.BLIP2QFormer(
        num_query_tokens=2,
        num_layers=1,
        num_heads=1,
        hidden_dim=8,
        intermediate_dim=16,
        vision_dim=8,
        cross_attention_frequency=1,
        dropout=0.0,
        layer_norm_epsilon=1e-6,
    )
    language = m.BLIP2CustomOPT(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        num_query_tokens=2,
        dropout=0.0,
        max_sequence_length=16,
        qformer_hidden_dim=8,
    )
    backbone = m.BLIP2Backbone(
        vision_encoder=vision, qformer=qformer, language_model=language
    )
    return m.BLIP2CausalLM(backbone=backbone, preprocessor=None)


def gemma4_assistant(m):
    return m.Gemma4AssistantCausalLM(
        backbone=gemma4(8).backbone,
        backbone_hidden_size=8,
        num_centroids=4,
        centroid_intermediate_top_k=2,
        use_ordered_embeddings=True,
    )


def gemma3n(m):
    backbone = m.Gemma3nBackbone(
        text_vocab_size=VOCAB,
        text_hidden_size=8,
        num_hidden_layers=1,
        pad_token_id=0,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        intermediate_size=[16],
        hidden_activation="gelu_approximate",
        layer_types=["full_attention"],
        sliding_window=4,
        rope_theta=10000.0,
        max_position_embeddings=32,
        vocab_size_per_layer_input=VOCAB,
        hidden_size_per_layer_input=2,
        altup_num_inputs=2,
        laurel_rank=2,
        final_logit_soft_cap=30.0,
    )
    return m.Gemma3nCausalLM(backbone=backbone, preprocessor=None)


def bart(m):
    backbone = m.BartBackbone(
        **_small(num_heads=2, **_FFW, max_sequence_length=16)
    )
    return m.BartSeq2SeqLM(backbone=backbone, preprocessor=None)


@pytest.mark.parametrize(
    "build,reason",
    [
        # Its logits come from `backbone.head`, inside the backbone: the
        # backbone outputs logits, and its token embedding is one-way.
        (rwkv7, "token_embedding, a `Embedding`, cannot project back"),
        # The backbone's output holds the image positions too; the logits
        # are sliced to the text after the head (PaliGemma) or before it.
        (pali_gemma, "ReversibleEmbedding -> GetItem"),
        (blip2, "BLIP2Backbone -> GetItem -> ReversibleEmbedding"),
        # A draft model for speculative decoding: its logits come from
        # a centroid-masked head on another input, and `call` raises.
        (gemma4_assistant, "Gemma4AssistantCausalLM replaces `call`"),
        # Its head is a method of `backbone.language_model` (a product
        # with `embed_tokens`, then a cap); `backbone.token_embedding` is
        # None.
        (gemma3n, "a model with `backbone.token_embedding`"),
        # Encoder-decoder: the backbone outputs a dict.
        (bart, "backbone outputs a dict of \\['decoder_sequence_output'"),
    ],
    ids=["RWKV-7", "PaliGemma", "BLIP-2", "Gemma 4 MTP", "Gemma 3n", "BART"],
)
def test_heads_the_fused_kernels_cannot_compute_are_refused(build, reason):
    model = build(keras_hub.models)
    named = f"Received: teacher=<{type(model).__name__} "
    with pytest.raises(ValueError, match=f"`teacher`.*{reason}") as info:
        keras_kd.CausalLMDistiller(llama(1, 8), model)
    assert named in str(info.value)
    with pytest.raises(ValueError, match=f"`student`.*{reason}"):
        keras_kd.CausalLMDistiller(model, llama(1, 8))
