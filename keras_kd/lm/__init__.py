"""Language-model distillation for keras-hub `CausalLM`s, computed from
hidden states without building `[tokens, vocab]` logits."""

from keras_kd.lm.alignment import align_tokens as align_tokens
from keras_kd.lm.alignment import match_vocabularies as match_vocabularies
from keras_kd.lm.causal_lm import CausalLMDistiller as CausalLMDistiller
from keras_kd.lm.top_k_cache import (
    cache_causal_lm_top_k as cache_causal_lm_top_k,
)
from keras_kd.lm.top_k_cache import (
    load_causal_lm_top_k as load_causal_lm_top_k,
)
