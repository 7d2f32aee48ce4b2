"""Every public name keras-kd had before its modules were reorganized is
still importable from the same public module, and every class is still
registered for serialization under the same name, so saved `.keras` files
and user code keep working.

The lists are a snapshot: a name may be added to keras-kd without touching
this file, but none may disappear.
"""

import importlib

import keras
import pytest

PUBLIC = {
    "keras_kd": [
        "CausalLMDistiller",
        "DKDDistiller",
        "Distiller",
        "FeatureDistiller",
        "MultiTeacherDistiller",
        "OfflineDistiller",
        "RDrop",
        "align_tokens",
        "cache_causal_lm_top_k",
        "cache_teacher_outputs",
        "load_causal_lm_top_k",
        "load_teacher_outputs",
        "match_vocabularies",
    ],
    "keras_kd.ops": [
        "attention_map",
        "attention_transfer",
        "binary_symmetric_kl_divergence",
        "cross_entropy",
        "decoupled_kd",
        "entropy",
        "feature_cosine_distance",
        "feature_mean_squared_error",
        "fused_linear_cross_entropy",
        "fused_linear_distillation_loss",
        "fused_linear_divergence",
        "fused_linear_logit_distance",
        "fused_linear_token_log_probs",
        "fused_linear_top_k_distillation_loss",
        "fused_linear_top_k_divergence",
        "global_pointer_kl_divergence",
        "hybrid_logit_distance",
        "jensen_shannon_divergence",
        "kl_divergence",
        "log_probabilities",
        "multilabel_categorical_crossentropy",
        "non_target_class_kd",
        "paired_symmetric_kl_divergence",
        "sparse_crossentropy_and_kl_divergence",
        "sparse_multilabel_categorical_crossentropy",
        "symmetric_kl_divergence",
        "target_class_kd",
        "universal_logit_distance",
    ],
    "keras_kd.losses": [
        "AttentionTransfer",
        "DecoupledKD",
        "DivergenceLoss",
        "FeatureCosineDistance",
        "FeatureMeanSquaredError",
        "GlobalPointerKLDivergence",
        "HybridLogitDistance",
        "JensenShannonDivergence",
        "KLDivergence",
        "MultilabelCategoricalCrossentropy",
        "RDropCategoricalCrossentropy",
        "RDropSparseCategoricalCrossentropy",
        "ReverseKLDivergence",
        "SparseMultilabelCategoricalCrossentropy",
        "SymmetricKLDivergence",
        "UniversalLogitDistance",
    ],
    "keras_kd.layers": [
        "EfficientGlobalPointer",
        "GlobalPointer",
        "mask_span_logits",
        "rotary_embedding",
    ],
    "keras_kd.callbacks": ["AlphaScheduler", "TemperatureScheduler"],
    "keras_kd.metrics": ["SpanF1", "SpanPrecision", "SpanRecall"],
}

# Registered name -> the public module that exports the class.
REGISTERED = {
    "AttentionTransfer": "keras_kd.losses",
    "CausalLMDistiller": "keras_kd",
    "DKDDistiller": "keras_kd",
    "DecoupledKD": "keras_kd.losses",
    "Distiller": "keras_kd",
    "EfficientGlobalPointer": "keras_kd.layers",
    "FeatureCosineDistance": "keras_kd.losses",
    "FeatureDistiller": "keras_kd",
    "FeatureMeanSquaredError": "keras_kd.losses",
    "GlobalPointer": "keras_kd.layers",
    "GlobalPointerKLDivergence": "keras_kd.losses",
    "HybridLogitDistance": "keras_kd.losses",
    "JensenShannonDivergence": "keras_kd.losses",
    "KLDivergence": "keras_kd.losses",
    "MultiTeacherDistiller": "keras_kd",
    "MultilabelCategoricalCrossentropy": "keras_kd.losses",
    "OfflineDistiller": "keras_kd",
    "RDrop": "keras_kd",
    "RDropCategoricalCrossentropy": "keras_kd.losses",
    "RDropSparseCategoricalCrossentropy": "keras_kd.losses",
    "ReverseKLDivergence": "keras_kd.losses",
    "SpanF1": "keras_kd.metrics",
    "SpanPrecision": "keras_kd.metrics",
    "SpanRecall": "keras_kd.metrics",
    "SparseMultilabelCategoricalCrossentropy": "keras_kd.losses",
    "SymmetricKLDivergence": "keras_kd.losses",
    "UniversalLogitDistance": "keras_kd.losses",
}


@pytest.mark.parametrize("module", sorted(PUBLIC))
def test_public_names_are_still_importable(module):
    found = importlib.import_module(module)
    missing = [name for name in PUBLIC[module] if not hasattr(found, name)]
    assert missing == []


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_names_resolve_to_the_public_class(name):
    cls = getattr(importlib.import_module(REGISTERED[name]), name)
    assert keras.saving.get_registered_object(f"keras_kd>{name}") is cls
    assert keras.saving.get_registered_name(cls) == f"keras_kd>{name}"


def test_no_class_is_registered_that_the_snapshot_lacks():
    # A new registered class is fine, but it must be exported publicly;
    # this keeps the two lists honest.
    registered = {
        key.split(">", 1)[1]
        for key in keras.saving.get_custom_objects()
        if key.startswith("keras_kd>")
    }
    for name in registered - set(REGISTERED):
        exported = [
            m for m in PUBLIC if hasattr(importlib.import_module(m), name)
        ]
        assert exported, f"keras_kd>{name} is registered but not exported"
